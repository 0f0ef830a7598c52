"""The memory plan of one training step: OUR step (``training_step``, backward, clipping, the optimizer step,
``zero_grad``, in the loop's order) on fake CPU tensors at the shapes of the chosen setting, counted by
:class:`xpsr.memory.tracker.LiveBytes`.

The optimizer state exists before the counted step (one fake step with zero gradients first): the plan is
the steady state of step 2 onwards, which is also the first step's peak (its state is made inside the step,
when the gradients already exist).
"""
from __future__ import annotations

import time

import torch

from xpsr.config import TrainConfig
from xpsr.memory.build import cast_for_training, materialize, meta_modules
from xpsr.memory.tracker import LiveBytes
from xpsr.models.build import DTYPES, trainable_parameters

GRAD_SCALE = 65536.0  # accelerate's GradScaler start value: fp16 losses are scaled before backward


def autocast_like_accelerate(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """What ``accelerator.prepare`` does to a model under mixed precision: its forward runs in autocast and
    its outputs are converted to fp32 (the ControlNet residuals reach the UNet in fp32)."""
    from accelerate.utils import convert_outputs_to_fp32

    inner = model.forward
    device_type = next(model.parameters()).device.type  # cpu for the plan's fake tensors, cuda on a GPU

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return inner(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(forward)


def fake_batch(cfg: TrainConfig, with_moments: bool, latent_shape: tuple[int, ...]) -> dict:
    """A batch as the DataLoader gives it: HR in [-1, 1], the LR condition at HR size, prompts as strings."""
    b, r = cfg.batch_size, cfg.data.crop_size
    batch = {"hr": torch.rand(b, 3, r, r) * 2 - 1, "lr_cond": torch.rand(b, 3, r, r),
             "content_prompt": ["a photo of a cat on a sofa"] * b, "quality_prompt": ["noisy, blurry"] * b}
    if with_moments:  # cached VAE posterior moments (mean, log-variance), as the latent cache stores them
        batch["hr_moments"] = torch.randn(b, 2 * latent_shape[0], *latent_shape[1:])
    return batch


def init_optimizer_state(optimizer, params: list[torch.nn.Parameter]) -> None:
    """One step with zero gradients so the (lazily made) optimizer state exists before counting."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def plan_training(cfg: TrainConfig, preset: str, with_costs: bool = False) -> dict:
    """Peak live bytes of one training step of ``cfg`` at ``preset`` shapes (tiny, sd15, sd21, sd15-narrow), by
    category and by module, and the instant of the peak. Runs on fake tensors: no memory, no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    modules = meta_modules(preset, cfg.model)
    cast_for_training(modules, cfg.mixed_precision, cfg.frozen_unet_dtype, cfg.text_encoder_device)
    tracker = LiveBytes()
    if with_costs:
        tracker.costs = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialize([modules.unet, modules.controlnet, modules.vae, modules.text_encoder])
        step = StepParts(modules, cfg)
        step.register(tracker)
        step.run(tracker)
    result = tracker.report()
    result.update(setting_summary(cfg, preset), trainable_params=sum(p.numel() for p in step.params),
                  plan_seconds=round(time.perf_counter() - t0, 1))
    if with_costs:
        result["costs"] = tracker.costs
    return result


class StepParts:
    """What one counted training step needs (the same for fake and for real tensors): the optimizer with its
    state, EMA copies, the batch, autocast as accelerate sets it up."""

    def __init__(self, modules, cfg: TrainConfig):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from xpsr.training.loop import make_optimizer

        self.modules, self.cfg = modules, cfg
        self.cached = getattr(cfg.data, "latent_cache", None) is not None
        if self.cached:  # no VAE encoder on the GPU: the step reads cached posterior moments
            modules.vae.encoder = None
            modules.vae.quant_conv = None
        self.dtype = DTYPES[cfg.mixed_precision]
        self.trainable = trainable_parameters(modules.unet, modules.controlnet)
        self.params = list(self.trainable.values())
        with unset_fake_temporarily():  # bitsandbytes computes its quantisation maps with real tensors
            self.optimizer = make_optimizer(cfg, self.params)
        with LiveBytes():  # (uncounted; its real-input fallback lets bitsandbytes read its maps)
            init_optimizer_state(self.optimizer, self.params)
        self.ema = [p.detach().clone() for p in self.params] if cfg.use_ema else []
        factor = 2 ** (len(modules.vae.config.block_out_channels) - 1)
        latent = (modules.unet.config.in_channels, cfg.data.crop_size // factor, cfg.data.crop_size // factor)
        self.batch = fake_batch(cfg, self.cached, latent)
        if self.dtype != torch.float32:
            for m in (modules.unet, modules.controlnet):
                autocast_like_accelerate(m, self.dtype)
        self.roots = dict(unet=modules.unet, controlnet=modules.controlnet, vae=modules.vae,
                          text_encoder=modules.text_encoder)
        self.embeds: dict = {}
        if cfg.text_encoder_device == "cpu":  # its weights and its forward are on the CPU, not counted; the
            # prompt embeddings it hands over (fp32) are on the GPU before the step, like the batch
            from xpsr.models.text import encode_prompts

            del self.roots["text_encoder"]
            b = cfg.batch_size
            content = self.batch["content_prompt"] if cfg.content_prompt == "caption" else [""] * b
            self.embeds = {"content_embeds": encode_prompts(modules.tokenizer, modules.text_encoder, content),
                           "quality_embeds": encode_prompts(modules.tokenizer, modules.text_encoder,
                                                            self.batch["quality_prompt"])}

    def state_tensors(self) -> list[tuple[torch.Tensor, str, str]]:
        """(tensor, category, module) of everything alive before the step."""
        out = [(p, "parameters", f"{root}.{n}") for root, m in self.roots.items() if m is not None
               for n, p in list(m.named_parameters()) + list(m.named_buffers())]
        out += [(t, "optimizer_state", "(optimizer)") for t in optimizer_tensors(self.optimizer)]
        out += [(t, "optimizer_state", "(ema)") for t in self.ema]
        out += [(v, "inputs", "(prompt embeddings)") for v in self.embeds.values()]
        return out + [(v, "inputs", "(batch)") for v in self.batch.values() if torch.is_tensor(v)]

    def register(self, tracker: LiveBytes) -> None:
        for t, category, module in self.state_tensors():
            tracker.register(t, category, module)

    def run(self, tracker: LiveBytes | None) -> None:
        """One micro-step; with ``tracker``: counted, gradients tagged as they are made."""
        from xpsr.training.step import training_step

        self.modules.controlnet.train()
        self.modules.unet.train()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        if tracker is None:
            _one_step(LiveBytes(), self.modules, self.batch, self.cfg, generator, self.dtype, self.optimizer,
                      self.params, training_step, self.embeds)
            return
        names = {id(p): n for n, p in self.trainable.items()}
        hooks = [p.register_post_accumulate_grad_hook(
            lambda p: tracker.retag(p.grad, "gradients", names[id(p)])) for p in self.params]
        with tracker, tracker.modules(**self.roots):
            _one_step(tracker, self.modules, self.batch, self.cfg, generator, self.dtype, self.optimizer,
                      self.params, training_step, self.embeds)
        for h in hooks:
            h.remove()


def _one_step(tracker, modules, batch, cfg: TrainConfig, generator, dtype, optimizer, params, training_step,
              embeds: dict):
    """The loop's micro-step (xpsr.training.loop.micro_step) with each stage named for the report."""
    with tracker.phase("forward"):
        result = training_step(modules, batch, cfg.dfc, cfg.content_prompt, generator, dtype, **embeds)
    with tracker.phase("backward"):
        loss = result.loss * GRAD_SCALE if cfg.mixed_precision == "fp16" else result.loss
        loss.backward()
        del loss
    with tracker.phase("clip"):
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    with tracker.phase("optimizer"):
        optimizer.step()
    with tracker.phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)


def setting_summary(cfg: TrainConfig, preset: str) -> dict:
    """The keys of ``cfg`` a training plan depends on."""
    return {"what": "train", "preset": preset, "resolution": cfg.data.crop_size, "batch_size": cfg.batch_size,
            "mixed_precision": cfg.mixed_precision, "frozen_unet_dtype": cfg.frozen_unet_dtype,
            "gradient_checkpointing": cfg.model.gradient_checkpointing, "use_8bit_adam": cfg.use_8bit_adam,
            "latent_cache": getattr(cfg.data, "latent_cache", None) is not None, "use_ema": cfg.use_ema,
            "text_encoder_device": cfg.text_encoder_device}
