"""The adapter the learner trains: a LoRA on every linear layer of the (possibly quantized) base
model, the live version's weights loaded into it before each round, its AdamW moments, and
writing it out as a published version.

The learner keeps its AdamW moments from round to round (a fresh Adam's first steps are sign
steps: every LoRA weight moves by the full learning rate, signal or noise), also across a
rejected candidate, whose weights it drops for the live ones. Only when it loads a version
that is not on its own line - at start, after a rollback - does it start a fresh optimizer.

Left out: saving the moments to disk (a restarted learner starts a fresh optimizer), gradient
checkpointing.
"""

from __future__ import annotations

import torch

from chatbot import adapters
from chatbot.config import Config
from chatbot.errors import AdapterError, ModelLoadError
from chatbot.model import LoadedModel


class TrainableAdapter:
    def __init__(self, config: Config, store, loaded: LoadedModel) -> None:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        self.config = config
        self.store = store
        self.loaded = loaded
        model = loaded.model
        if loaded.quantize == "int4":
            raise ModelLoadError("the learner trains on float weights, and 4-bit CPU layers have "
                                 "no backward: load its model with load_model(config, "
                                 "training=True)")
        if loaded.quantize != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.initial_lora = {k: v.detach().clone()
                             for k, v in get_peft_model_state_dict(self.model).items()}
        self.version: int | None = None  # whose weights it holds; None: unknown (half-trained)
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_origin: int | None = None  # the version the moments grew from

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sync_to_live(self) -> None:
        """Load the live adapter's weights (v0: a fresh LoRA), unless it holds them already."""
        from peft import set_peft_model_state_dict

        live = self.store.live_adapter()
        version = live["version"] if live else 0
        if version == self.version:
            return
        if version == 0:
            state = self.initial_lora
        else:
            verified = adapters.verified_copy(self.config.adapters_dir, live,
                                              base_model=self.loaded.model_id,
                                              fetch=self.store.adapter_files)
            if verified.config.get("r") != self.config.lora_r:
                raise AdapterError(f"the live adapter v{version} has rank "
                                   f"{verified.config.get('r')}, the learner was started with "
                                   f"--lora-r {self.config.lora_r}")
            state = adapters.load_state_dict(verified)
        result = set_peft_model_state_dict(self.model, state)
        if version != self.optimizer_origin:
            # Moments gathered on another line of versions (start, rollback) do not apply.
            # After a rejected candidate the live version is the one the moments grew from,
            # and a fresh Adam's first sign-steps would only add noise: keep them.
            self.optimizer = None
            self.optimizer_origin = version
        if getattr(result, "unexpected_keys", None):
            raise AdapterError(f"v{version} has weights this model lacks: "
                               f"{result.unexpected_keys[:3]}")
        self.version = version

    def the_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW the round steps with: the moments kept, or a fresh one."""
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.parameters(), lr=self.config.lr,
                                               weight_decay=0.0)
        return self.optimizer

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the trainable weights as they are now."""
        return [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def move_between(self, start: list[torch.Tensor], end: list[torch.Tensor],
                     fraction: float) -> None:
        """Set the trainable weights `fraction` of the way from `start` to `end` (snapshots),
        each LoRA matrix on its own: the step a round took, shortened."""
        for param, a, b in zip(self.parameters(), start, end, strict=True):
            param.copy_(torch.lerp(a, b, fraction))

    def went_live(self, version: int) -> None:
        """The weights it holds are now the live `version`, and the moments grew to them."""
        self.version = version
        self.optimizer_origin = version

    def publish(self, version: int, parent: int, metrics: dict
                ) -> tuple[dict, dict[str, bytes] | None]:
        """Write the weights as `v{version}` (adapters.publish). Returns its registry row, less
        its status and reason, and the files the store keeps with it (PostgreSQL)."""
        folder, sha = adapters.publish(
            self.config.adapters_dir, version, self.model.save_pretrained,
            base_model=self.loaded.model_id, parent_version=parent, metrics=metrics)
        row = {"version": version, "path": folder.name, "parent_version": parent,
               "base_model": self.loaded.model_id, "sha256": sha, "metrics": metrics}
        return row, adapters.folder_files(folder) if self.store.keeps_adapter_files else None
