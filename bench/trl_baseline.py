"""The anchor for `learn --vs trl`: TRL's RLOOTrainer given the same oracle, the same base
model, LoRA of the same shape, the same sampling settings and the same number of labelled
pairs, evaluated by the same Evaluator at the same label counts.

One labelled pair is one prompt with its two generations, judged by the oracle (reward 1 to
the preferred one, 0 to the other, 1/2 each on a tie) - what one vote is in Duet. TRL trains
offline in the classic way: it generates, scores and steps, with no server around it.

Needs `pip install trl` (bench/requirements.txt); nothing else in Duet imports it.
"""

from __future__ import annotations

import logging
import tempfile

from bench.oracles import Oracle
from bench.simulate import Evaluation, Evaluator
from chatbot.config import Config
from chatbot.model import load_model

log = logging.getLogger(__name__)

GENERATIONS = 2
PROMPTS_PER_STEP = 4


def oracle_reward(oracle: Oracle):
    """A TRL reward function: completions come in consecutive groups of GENERATIONS."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = []
        for i in range(0, len(texts), GENERATIONS):
            verdict = oracle.prefer(texts[i], texts[i + 1])
            rewards += {"A": [1.0, 0.0], "B": [0.0, 1.0], "tie": [0.5, 0.5]}[verdict]
        return rewards

    reward.__name__ = f"oracle_{oracle.name}"
    return reward


def run_trl(config: Config, oracle: Oracle, train_prompts: list[str], eval_prompts: list[str],
            labels: int, checkpoints: list[int], seed: int = 0) -> list[Evaluation]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    loaded = load_model(config)
    evaluator = Evaluator(config, oracle, eval_prompts, loaded.tokenizer, loaded.device, seed)
    evaluations = [evaluator.evaluate(loaded.model, 0, 0)] if 0 in checkpoints else []
    steps = labels // PROMPTS_PER_STEP
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                 for p in (train_prompts * (labels // len(train_prompts) + 1))
                                 [:steps * PROMPTS_PER_STEP]])

    class EvaluateAtLabels(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen = state.global_step * PROMPTS_PER_STEP
            if seen in checkpoints:
                was_training = model.training
                model.eval()
                evaluations.append(evaluator.evaluate(model, seen, state.global_step))
                log.info("TRL at %d labels: %s", seen, evaluations[-1])
                model.train(was_training)

    with tempfile.TemporaryDirectory(prefix="duet-trl-") as out:
        args = RLOOConfig(
            output_dir=out, num_generations=GENERATIONS,
            per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
            max_completion_length=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, top_k=0, learning_rate=config.lr, beta=config.beta,
            max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
            bf16=False, use_cpu=loaded.device.type == "cpu", seed=seed,
            shuffle_dataset=True)
        trainer = RLOOTrainer(
            model=loaded.model, reward_funcs=oracle_reward(oracle), args=args,
            train_dataset=dataset, processing_class=loaded.tokenizer,
            peft_config=LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                   lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
            callbacks=[EvaluateAtLabels()])
        trainer.train()
    return evaluations
