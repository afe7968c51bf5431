"""Optimizers and learning-rate schedule for BERT pretraining.

- `Lamb`: LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
  76 minutes"), the optimizer of the 64k-batch BERT recipe, as a plain torch.optim.Optimizer that
  runs on CPU and GPU, in two variants: "clamped" (DeepSpeed FusedLamb) and "nvidia" (apex
  FusedLAMB, NVIDIA's BERT recipe). Tensor-parallel aware: the trust ratio of a sharded weight
  uses the norm of the whole weight, not of this rank's shard.
- `lamb_kwargs_from_ds_params()`: a ds_config's LAMB "params" block as `build_optimizer` kwargs.
- `build_optimizer()`: LAMB (DeepSpeed's FusedLamb on GPU when it builds and can express the
  variant, else `Lamb`) or AdamW (torch's, fused on GPU), with bias and LayerNorm parameters
  excluded from weight decay.
- `warmup_poly_decay()` / `build_scheduler()`: linear warm-up to the peak lr (used once), then
  polynomial (power 1 = linear) decay to `min_lr_ratio` at `total_steps`; fine-tuning uses them
  too, with the decay starting one update later (`peak_step`).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = [
    "Lamb",
    "LAMB_VARIANTS",
    "LambVariant",
    "lamb_kwargs_from_ds_params",
    "check_optimizer_for_zero",
    "param_groups",
    "build_optimizer",
    "warmup_poly_decay",
    "build_scheduler",
    "OptimizerConfigError",
]


class OptimizerConfigError(ValueError):
    """An optimizer or schedule setting that cannot work, with what to change."""


class _VariantDefault:
    """The default of `max_trust`/`min_trust`: the bounds of the chosen variant (see LAMB_VARIANTS).

    A sentinel rather than None because None already means "no bound" in the clamped variant.
    """

    def __repr__(self):
        return "<the variant's default>"


VARIANT_DEFAULT = _VariantDefault()
_ALGORITHM_KEYS = ("variant", "max_trust", "min_trust")


def _clamped_trust(ratio: torch.Tensor, group: dict) -> torch.Tensor:
    """DeepSpeed FusedLamb: every tensor gets the ratio, clamped to [min_trust, max_trust]."""
    if group["max_trust"] is not None:
        ratio = ratio.clamp(max=group["max_trust"])
    if group["min_trust"] is not None:
        ratio = ratio.clamp(min=group["min_trust"])
    return ratio


def _nvidia_trust(ratio: torch.Tensor, group: dict) -> torch.Tensor:
    """apex FusedLAMB (use_nvlamb=False): the unclamped ratio where the group decays, else 1.

    ZeRO keeps a group's hyper-parameters on its flat partition, so deciding per group holds
    there as well as on whole tensors.
    """
    if group["weight_decay"] == 0.0:
        return torch.ones_like(ratio)
    return ratio


class LambVariant(NamedTuple):
    """How a LAMB variant turns the guarded ratios ||w|| / ||u|| (1 where either norm is 0) of
    one parameter group into the ratios applied, and its (min_trust, max_trust) defaults; None
    for a variant that has no clamp and so accepts no bounds."""

    rule: Callable[[torch.Tensor, dict], torch.Tensor]
    bounds: Optional[Tuple[Optional[float], Optional[float]]]


LAMB_VARIANTS: Dict[str, LambVariant] = {
    "clamped": LambVariant(_clamped_trust, (0.01, 10.0)),
    "nvidia": LambVariant(_nvidia_trust, None),
}


def _resolve_trust_bounds(variant, min_trust, max_trust) -> Tuple[Optional[float], Optional[float]]:
    """Check `variant` and its trust bounds; return the bounds with the variant's defaults filled in."""
    if not isinstance(variant, str) or variant not in LAMB_VARIANTS:
        raise OptimizerConfigError(
            f"LAMB variant {variant!r} is unknown; use one of {sorted(LAMB_VARIANTS)} ('nvidia': "
            "NVIDIA's BERT recipe, apex FusedLAMB; 'clamped': DeepSpeed FusedLamb)"
        )
    bounds = LAMB_VARIANTS[variant].bounds
    if bounds is None:
        given = {k: v for k, v in (("max_trust", max_trust), ("min_trust", min_trust))
                 if v is not VARIANT_DEFAULT and v is not None}
        if given:
            raise OptimizerConfigError(
                f"LAMB variant {variant!r} does not clamp the trust ratio, so {given} would be ignored: "
                "drop them (ds_config: remove \"max_coeff\"/\"min_coeff\"), or use variant 'clamped'"
            )
        return None, None
    min_trust = bounds[0] if min_trust is VARIANT_DEFAULT else min_trust
    max_trust = bounds[1] if max_trust is VARIANT_DEFAULT else max_trust
    if max_trust is not None and min_trust is not None and min_trust > max_trust:
        raise OptimizerConfigError(
            f"LAMB min_trust ({min_trust}) must be <= max_trust ({max_trust}): the trust ratio is "
            "clamped to [min_trust, max_trust] (DeepSpeed min_coeff/max_coeff); swap or fix them"
        )
    return min_trust, max_trust


class Lamb(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training.

    Per parameter tensor w with gradient g, at step t (1-based):

        m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)                v_hat = v / (1 - b2^t)      (if bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w                (decoupled decay)
        r = ||w|| / ||u||  (1 when either norm is 0), then the variant's rule
        w = w - lr * r * u

    The zero guards: a weight of norm 0 (a freshly zeroed bias) or an update of norm 0 has no
    meaningful ratio, so it falls back to plain Adam-with-decay (r = 1).

    `variant` picks the rule (LAMB_VARIANTS):
    - "clamped" (default): r clamped to [min_trust, max_trust] for every tensor. The bounds
      mirror DeepSpeed's FusedLamb `min_coeff`/`max_coeff` (defaults 0.01 and 10), so that
      switching between the CPU and the fused GPU optimizer does not change the algorithm;
      `None` disables a bound.
    - "nvidia": apex FusedLAMB as NVIDIA's BERT recipe runs it (use_nvlamb=False,
      adam_w_mode=True, grad_averaging=True, bias_correction=True): r unclamped, and only for
      parameter groups with weight_decay != 0; biases and LayerNorm (weight_decay 0) take the
      plain Adam step lr * u. Trust bounds do not apply (passing any is an error). apex also
      clips by the global gradient norm (max_grad_norm=1.0) inside the optimizer; here that is
      DeepSpeed's "gradient_clipping": 1.0, applied before `step()` (up to DeepSpeed's 1e-6 in
      the clip factor), so this optimizer does not clip.

    Tensor parallelism: pass `tp_group`; parameters tagged `tensor_model_parallel` (megatron's
    attribute, set by pretrain.tensor_parallel) get their squared norms summed over that group, so every
    shard of a weight is scaled by the trust ratio of the full weight, as in a dense model.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_trust=VARIANT_DEFAULT,
        min_trust=VARIANT_DEFAULT,
        trust_ratio: bool = True,
        tp_group=None,
        variant: str = "clamped",
    ):
        if lr < 0.0:
            raise OptimizerConfigError(f"LAMB lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerConfigError(f"LAMB betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise OptimizerConfigError(f"LAMB eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise OptimizerConfigError(f"LAMB weight_decay must be >= 0, got {weight_decay}")
        min_trust, max_trust = _resolve_trust_bounds(variant, min_trust, max_trust)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust=max_trust, min_trust=min_trust,
                        trust_ratio=trust_ratio, variant=variant)
        super().__init__(params, defaults)
        self.tp_group = tp_group

    def add_param_group(self, param_group):
        # Which parameters are TP shards, recorded now: DeepSpeed's bf16/fp16 wrappers replace
        # group["params"] with fp32 copies that lose megatron's attributes but keep the order.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["tp_split"] = [bool(getattr(p, "tensor_model_parallel", False)) for p in group["params"]]
        _resolve_trust_bounds(group["variant"], None, None)  # a group may name its own variant

    def load_state_dict(self, state_dict):
        """torch's, except that the algorithm (variant, trust bounds) stays the one this optimizer
        was built with: the job's config decides it, and a checkpoint saved before variants
        existed has none (it was "clamped")."""
        chosen = [{k: g[k] for k in _ALGORITHM_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for i, (group, keep) in enumerate(zip(self.param_groups, chosen)):
            saved = {k: group.get(k, "clamped" if k == "variant" else None) for k in _ALGORITHM_KEYS}
            if saved != keep:
                logger.warning("LAMB parameter group %d: the checkpoint has %s, continuing with %s "
                               "(from the config)", i, saved, keep)
            group.update(keep)

    def attach_zero_partitions(self, zero_optimizer) -> None:
        """Make LAMB exact under DeepSpeed ZeRO stage 1/2 (call right after deepspeed.initialize).

        ZeRO replaces each parameter group by this rank's slice of the group's flattened
        parameters. Knowing where every parameter lies in that flat buffer, the squared norms of
        w and u are summed per parameter over the data-parallel group (and over the TP group for
        TP shards), so each slice is scaled by the trust ratio of the whole tensor. Checked
        against DeepSpeed 0.19.8's DeepSpeedZeroOptimizer (stage 1 and 2).
        """

        for attr in ("round_robin_bit16_groups", "partition_size", "real_dp_process_group"):
            if not hasattr(zero_optimizer, attr):
                raise TypeError(
                    f"attach_zero_partitions needs DeepSpeed's ZeRO stage 1/2 optimizer (engine.optimizer), "
                    f"got {type(zero_optimizer).__name__}"
                )
        if getattr(zero_optimizer, "optimizer", None) is not self:
            raise ValueError("attach_zero_partitions: this Lamb is not the optimizer wrapped by that ZeRO optimizer")
        layouts = {}
        for i, group in enumerate(self.param_groups):
            params = zero_optimizer.round_robin_bit16_groups[i]
            dp_group = zero_optimizer.real_dp_process_group[i]
            size = int(zero_optimizer.partition_size[i])
            lo = dist.get_rank(group=dp_group) * size
            segments, offset = [], 0
            # The flat buffer is the parameters of round_robin_bit16_groups[i] back to back
            # (alignment padding only at the end); rank r owns [r * size, (r + 1) * size).
            for j, prm in enumerate(params):
                a, b = max(offset, lo), min(offset + prm.numel(), lo + size)
                if a < b:
                    segments.append((j, a - lo, b - a))
                offset += prm.numel()
            if len(group["params"]) != 1 or group["params"][0].numel() != size:
                raise ValueError(f"parameter group {i} is not one flat partition of {size} elements")
            # Keyed by the flat tensor, not the group index: DeepSpeed steps one group at a time
            # with optimizer.param_groups temporarily set to that group alone.
            layouts[id(group["params"][0])] = dict(
                segments=segments,
                split=[bool(getattr(prm, "tensor_model_parallel", False)) for prm in params],
                dp_group=dp_group,
            )
        self._zero_layouts = layouts

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layouts = getattr(self, "_zero_layouts", {})

        # Pass 1: moments and the norms of the raw updates. Every (whole) tensor gets a row of
        # squared norms [||w||^2, ||u||^2]; rows are summed over the dp group where a tensor is
        # spread over ZeRO partitions and over the TP group where it is a TP shard, in one
        # collective each. The updates themselves are not kept: holding an fp32 update for every
        # parameter at once would cost a full fp32 copy of the model (~1.3 GB at bert-large).
        # Pass 2 recomputes each one from the moments (same ops, same bits) just before using it.
        rows, row_split, row_dp = [], [], []
        work = []  # (param, group, segments: [(row, start, length)] or None, row)
        dp_group = None
        for group in self.param_groups:
            layout = layouts.get(id(group["params"][0])) if len(group["params"]) == 1 else None
            if layout is None and len(group["tp_split"]) != len(group["params"]):
                raise RuntimeError(
                    "Lamb: a parameter group now holds other tensors than it was built with (DeepSpeed "
                    "ZeRO flattens them into one partition), so the per-tensor trust ratio would be "
                    "computed over unrelated weights. Call optimizer.attach_zero_partitions(engine.optimizer) "
                    "after deepspeed.initialize (ZeRO 1/2), or use ZeRO stage 0."
                )
            for p, split in zip(group["params"], group["tp_split"] if layout is None else [None]):
                if p.grad is None:
                    continue
                self._advance_moments(p, group)
                update = self._raw_update(p, group)
                if layout is None:
                    rows.append(torch.stack([p.float().pow(2).sum(), update.pow(2).sum()]))
                    row_split.append(split)
                    row_dp.append(False)
                    work.append((p, group, None, len(rows) - 1))
                    continue
                base = len(rows)
                w32 = p.float()
                zero = torch.zeros(2, device=p.device)
                rows.extend(zero.clone() for _ in layout["split"])
                row_split.extend(layout["split"])
                row_dp.extend(True for _ in layout["split"])
                segments = []
                for j, start, length in layout["segments"]:
                    rows[base + j] = torch.stack([
                        w32.narrow(0, start, length).pow(2).sum(), update.narrow(0, start, length).pow(2).sum()
                    ])
                    segments.append((base + j, start, length))
                dp_group = layout["dp_group"]
                work.append((p, group, segments, None))

        if not work:
            return loss

        sq = torch.stack(rows)
        sq = self._sum_rows(sq, row_dp, dp_group)
        if self.tp_group is not None:
            sq = self._sum_rows(sq, row_split, self.tp_group)
        norms = sq.sqrt()

        trust = {}
        for p, group, segments, row in work:
            update = self._raw_update(p, group)
            if id(group) not in trust:
                trust[id(group)] = self._trust(norms, group)
            ratios = trust[id(group)]
            if segments is None:
                self.state[p]["last_trust_ratio"] = ratios[row].detach()
                p.add_((update * (-group["lr"] * ratios[row])).to(p.dtype))
                continue
            for r, start, length in segments:
                p.narrow(0, start, length).add_(
                    (update.narrow(0, start, length) * (-group["lr"] * ratios[r])).to(p.dtype)
                )
            rows = self._on_device(tuple(r for r, _, _ in segments), torch.long, ratios.device)
            self.state[p]["last_trust_ratio"] = ratios.index_select(0, rows).detach()
        return loss

    def _advance_moments(self, p, group):
        """Advance the step count and the Adam moments of `p` by its gradient."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Lamb does not support sparse gradients")
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            # Moments in fp32 even for low-precision params: v underflows in bf16.
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g32 = grad.float()
        m.mul_(beta1).add_(g32, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)

    def _raw_update(self, p, group):
        """The raw LAMB update m_hat / (sqrt(v_hat) + eps) + wd * w from the current moments (a
        pure function of the state and `p`: calling it twice gives the same tensor)."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if group["bias_correction"]:
            m_hat = m / (1.0 - beta1 ** t)
            v_hat = v / (1.0 - beta2 ** t)
        else:
            m_hat, v_hat = m, v.clone()  # sqrt_ below must not touch the moment itself
        update = m_hat / (v_hat.sqrt_().add_(group["eps"]))
        if group["weight_decay"] != 0.0:
            update.add_(p.float(), alpha=group["weight_decay"])
        return update

    def _on_device(self, values: tuple, dtype, device) -> torch.Tensor:
        """`values` as a tensor on `device`, made once per layout: building it from a Python list
        every step would be a host-to-device copy that waits for the GPU stream."""
        cache = self.__dict__.setdefault("_device_tensors", {})
        key = (values, dtype, str(device))
        if key not in cache:
            cache[key] = torch.tensor(values, dtype=dtype).to(device)
        return cache[key]

    def _sum_rows(self, sq, mask, group):
        """Sum the rows selected by `mask` over `group` (others, identical on every rank, stay)."""
        if group is None or not any(mask):
            return sq

        if dist.get_world_size(group) == 1:
            return sq
        sel = self._on_device(tuple(mask), torch.bool, sq.device)[:, None]
        partial = torch.where(sel, sq, torch.zeros_like(sq))
        dist.all_reduce(partial, group=group)
        return torch.where(sel, partial, sq)

    @staticmethod
    def _trust(norms, group):
        """Trust ratios for every row: ||w|| / ||u||, 1 when either is 0, then the variant's rule."""
        if not group["trust_ratio"]:
            return torch.ones(norms.shape[0], device=norms.device)
        w_norm, u_norm = norms[:, 0], norms[:, 1]
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        return LAMB_VARIANTS[group["variant"]].rule(ratio, group)


def _is_no_decay(module: nn.Module, param_name: str) -> bool:
    # BERT recipe: no weight decay on biases and LayerNorm parameters (their scale is not a
    # capacity to regularise, and decaying LayerNorm gains towards 0 hurts).
    return param_name == "bias" or isinstance(module, (nn.LayerNorm,)) or "LayerNorm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: decayed weights, and biases + LayerNorm parameters with weight_decay 0.

    Each group carries `names` (parameter names, tied parameters once) for logging and tests.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if _is_no_decay(module, name) or full.endswith(".bias") or ".LayerNorm." in f".{full}":
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def optimizer_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """`param_groups` as an optimizer (or DeepSpeed's `model_parameters`) takes them: without the
    bookkeeping `names`. Pretraining and fine-tuning both build their groups here."""
    return [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, weight_decay)]


def _fused_lamb(groups, lr, betas, eps, weight_decay, max_trust, min_trust):
    """DeepSpeed's CUDA FusedLamb (the "clamped" variant only), or None when it cannot be built here."""
    try:
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         max_coeff=max_trust if max_trust is not None else float("inf"),
                         min_coeff=min_trust if min_trust is not None else 0.0)
    except Exception as exc:  # noqa: BLE001 - any build/import failure means "use ours"
        logger.warning("DeepSpeed FusedLamb unavailable (%s); using pretrain.optim.Lamb", exc)
        return None


# ds_config LAMB "params" key -> build_optimizer keyword (DeepSpeed FusedLamb's names, plus "variant").
_DS_LAMB_KEYS = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
                 "max_coeff": "max_trust", "min_coeff": "min_trust", "variant": "variant"}


def lamb_kwargs_from_ds_params(params: dict, flag: str = "--ds_config optimizer.params") -> dict:
    """A ds_config's LAMB `optimizer.params` block as `build_optimizer(..., **kwargs)` keywords.

    Reads lr (required), betas, eps, weight_decay (defaults (0.9, 0.999), 1e-6, 0.0), "variant"
    ("nvidia" or "clamped", default "clamped") and, for "clamped" only, max_coeff/min_coeff
    (absent: DeepSpeed's 10 and 0.01; null: no bound). Unknown keys and wrong types are errors
    that name `flag`, the key and what to write instead.
    """
    if not isinstance(params, dict):
        raise OptimizerConfigError(f"{flag}: expected an object of LAMB parameters, got {type(params).__name__}")
    unknown = sorted(set(params) - set(_DS_LAMB_KEYS))
    if unknown:
        hint = ""
        if "max_grad_norm" in unknown:
            hint = (' (clip with the ds_config\'s top-level "gradient_clipping" instead, which runs '
                    'before the optimizer)')
        raise OptimizerConfigError(
            f"{flag}: unknown LAMB parameter(s) {unknown}{hint}; the known ones are {sorted(_DS_LAMB_KEYS)}"
        )

    def number(key, default):
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptimizerConfigError(f"{flag}: \"{key}\" must be a number, got {value!r}")
        return float(value)

    if "lr" not in params:
        raise OptimizerConfigError(f"{flag}: LAMB needs \"lr\"")
    betas = params.get("betas", (0.9, 0.999))
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in betas)):
        raise OptimizerConfigError(f"{flag}: \"betas\" must be two numbers like [0.9, 0.999], got {betas!r}")
    variant = params.get("variant", "clamped")
    kwargs = dict(lr=number("lr", None), betas=(float(betas[0]), float(betas[1])), eps=number("eps", 1e-6),
                  weight_decay=number("weight_decay", 0.0), variant=variant)
    bounds = [k for k in ("max_coeff", "min_coeff") if k in params]
    if bounds and variant in LAMB_VARIANTS and LAMB_VARIANTS[variant].bounds is None:
        # Said in the ds_config's own key names (and a null bound counts too), before the generic check.
        raise OptimizerConfigError(
            f"{flag}: {bounds} clamp the trust ratio, which the {variant!r} variant does not do; "
            f"remove them, or set \"variant\": \"clamped\" to keep the clamp"
        )
    for key in bounds:
        kwargs[_DS_LAMB_KEYS[key]] = None if params[key] is None else number(key, None)
    try:
        _resolve_trust_bounds(variant, kwargs.get("min_trust", VARIANT_DEFAULT),
                              kwargs.get("max_trust", VARIANT_DEFAULT))
    except OptimizerConfigError as e:
        raise OptimizerConfigError(f"{flag}: {e}") from None
    return kwargs


def build_optimizer(
    model: nn.Module,
    name: str = "lamb",
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    max_trust=VARIANT_DEFAULT,
    min_trust=VARIANT_DEFAULT,
    tp_group=None,
    device: Optional[str] = None,
    zero_stage: Optional[int] = None,
    flag: str = "--optimizer",
    variant: str = "clamped",
) -> torch.optim.Optimizer:
    """LAMB or AdamW over `param_groups(model, weight_decay)`.

    LAMB is DeepSpeed's FusedLamb only for the "clamped" variant, on GPU, without tensor
    parallelism and with `zero_stage=0` stated: FusedLamb takes one clamped trust ratio per
    tensor it is given, which is wrong for TP shards, for ZeRO's flat partitions and for the
    "nvidia" variant (no clamp, no ratio on weight_decay-0 groups). Everywhere else it is `Lamb`
    (call `attach_zero_partitions` under ZeRO 1/2). `variant`, `max_trust` and `min_trust` are
    LAMB's (see `Lamb`). AdamW uses torch's fused kernel on GPU.
    """
    device = device or next(model.parameters()).device.type
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    name = name.lower()
    tp_size = 1
    if tp_group is not None:

        tp_size = dist.get_world_size(tp_group)
    if name == "lamb":
        # Checked before choosing FusedLamb, which does not check.
        min_trust, max_trust = _resolve_trust_bounds(variant, min_trust, max_trust)
        if variant == "clamped" and device == "cuda" and tp_size == 1 and zero_stage == 0:
            opt = _fused_lamb(groups, lr, betas, eps, weight_decay, max_trust, min_trust)
            if opt is not None:
                return opt
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    max_trust=max_trust, min_trust=min_trust, tp_group=tp_group, variant=variant)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=(device == "cuda"))
    raise OptimizerConfigError(f"{flag} {name!r} is not supported; use 'lamb' or 'adamw'")


def check_optimizer_for_zero(name: str, zero_stage: int, flag: str = "--optimizer") -> None:
    """Refuse LAMB under ZeRO-3, before anything starts.

    ZeRO hands the client optimizer flat partitions instead of tensors. For stage 1/2 `Lamb`
    recovers each tensor's extent (`attach_zero_partitions`); stage 3's partitioning is not
    supported, and a per-tensor trust ratio over a flat partition would not be LAMB.
    """
    if name.lower() == "lamb" and zero_stage >= 3:
        raise OptimizerConfigError(
            f"{flag} lamb supports ZeRO stage 0, 1 or 2 (the ds_config has stage {zero_stage}): "
            f"LAMB's per-tensor trust ratio is not implemented over ZeRO-3 partitions. "
            f"Set \"zero_optimization\": {{\"stage\": 2}} or use {flag} adamw"
        )


def warmup_poly_decay(step: int, warmup_steps: int, total_steps: int, power: float = 1.0,
                      min_lr_ratio: float = 0.0, peak_step: Optional[int] = None) -> float:
    """Learning-rate multiplier after `step` optimizer steps (the lr the next update uses).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the very first update already
    moves the weights and the full lr is used exactly once, by update number `warmup_steps`
    (step = warmup_steps - 1).
    Decay, from that peak step p = max(warmup_steps - 1, 0) on:
    min_lr_ratio + (1 - min_lr_ratio) * ((total - step) / (total - p)) ** power, which is 1 at p
    (continuous with the warm-up, no second step at the peak), min_lr_ratio at `total_steps`,
    and min_lr_ratio after it.
    `peak_step` moves the start of the decay: fine-tuning passes `warmup_steps`, so that updates
    number warmup_steps and warmup_steps + 1 both use the full lr (its schedule since its first
    version; its published figures were measured with it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    peak = max(warmup_steps - 1, 0) if peak_step is None else peak_step
    if total_steps <= peak:
        return min_lr_ratio
    remaining = max(0.0, (total_steps - step) / (total_steps - peak))
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining ** power


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    power: float = 1.0, min_lr_ratio: float = 0.0,
                    flag: str = "--warmup_steps", peak_step: Optional[int] = None
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `warmup_poly_decay`; `scheduler.step()` once per optimizer step."""
    if total_steps < 1:
        raise OptimizerConfigError(f"total steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise OptimizerConfigError(
            f"{flag} {warmup_steps} must be between 0 and the number of training steps ({total_steps})"
        )
    if power <= 0:
        raise OptimizerConfigError(f"decay power must be > 0 (1 = linear), got {power}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptimizerConfigError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def multiplier(step):
        return warmup_poly_decay(step, warmup_steps, total_steps, power, min_lr_ratio, peak_step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
