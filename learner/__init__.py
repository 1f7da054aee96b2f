"""The learner of Duet: objectives (pure loss functions), round data, the promotion gate and
the worker loop that turns votes into published LoRA adapter versions. Run it alone with
`python -m learner --data-dir DIR`; `python app.py` starts it as a child process."""
