"""Tensor parallelism: megatron-core groups, the DeepSpeed `mpu` adapter, the TP dropout RNG,
the layer factory, and the split rules that turn full HF weights into per-rank shards and back.

- `validate_parallel_config()`: world % tp, heads % tp, hidden/intermediate/vocab divisibility,
  checked before any process group starts.
- `initialize_model_parallel()`: megatron-core `parallel_state` groups (tp inner, dp outer), on
  the default group `pretrain.launch.init_distributed()` starts.
- `MegatronMPU`: the object DeepSpeed needs as `mpu=` so that ZeRO and the gradient norm know
  which ranks hold shards of the same tensor (without it DeepSpeed averages TP shards as if they
  were data-parallel replicas: wrong from step 0, no error).
- `MegatronLayerFactory`: the model's TP seam (docs/interfaces.md) on megatron-core layers.
- `default_partition_dims()` / `tp_partition_dims()`: which tensors are split and along which dim,
  the one definition every reader (shard/gather, checkpoints) uses.
- `shard_state_dict()` / `unshard_state_dicts()` / `gather_full_state_dict()`: full HF weights
  <-> per-rank shards. Shards keep the HF parameter names; only shapes differ.

megatron-core is imported inside the functions that use it: importing it costs seconds and warns
(pretrain/quiet.py), and the offline users of this module (checkpoint readers, HF export,
fine-tuning, pre-launch validation) never need it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import timedelta
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.launch import DEFAULT_TIMEOUT, ParallelConfigError
from pretrain.layers import IGNORE_INDEX
from pretrain.vocab import padded_vocab_size

logger = logging.getLogger(__name__)

__all__ = [
    "validate_parallel_config",
    "validate_model_for_tp",
    "initialize_model_parallel",
    "destroy_model_parallel",
    "MegatronMPU",
    "TensorParallelRNG",
    "MegatronLayerFactory",
    "tp_partition_dims",
    "mark_tensor_parallel_params",
    "load_full_state_dict",
    "default_partition_dims",
    "universal_checkpoint_patterns",
    "shard_state_dict",
    "unshard_state_dicts",
    "gather_full_state_dict",
]


# --------------------------------------------------------------------------------------------
# Validation and megatron-core groups
# --------------------------------------------------------------------------------------------


def validate_parallel_config(
    world_size: int,
    tp_size: int,
    num_attention_heads: Optional[int] = None,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    tp_flag: str = "--tp",
) -> int:
    """Check that `tp_size` can split this model on `world_size` ranks; return the dp size.

    `vocab_size` is the number of word-embedding rows the model is built with, i.e. the padded
    vocabulary (`pretrain.vocab.padded_vocab_size`). Every message names what to change. Call it
    before `init_distributed()`.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ParallelConfigError(f"{tp_flag} must be a positive integer, got {tp_size!r}")
    if world_size % tp_size:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by {tp_flag} {tp_size}: world size = dp x tp, "
            f"so launch a multiple of {tp_size} processes or choose a {tp_flag} that divides {world_size}"
        )
    if num_attention_heads is not None and num_attention_heads % tp_size:
        raise ParallelConfigError(
            f"num_attention_heads {num_attention_heads} is not divisible by {tp_flag} {tp_size}: each "
            f"tensor-parallel rank holds whole heads; use a {tp_flag} that divides {num_attention_heads}"
        )
    if hidden_size is not None and hidden_size % tp_size:
        raise ParallelConfigError(f"hidden_size {hidden_size} is not divisible by {tp_flag} {tp_size}")
    if intermediate_size is not None and intermediate_size % tp_size:
        raise ParallelConfigError(
            f"intermediate_size {intermediate_size} is not divisible by {tp_flag} {tp_size}: the "
            f"feed-forward layer is split column-wise; use a {tp_flag} that divides {intermediate_size}"
        )
    if vocab_size is not None and vocab_size % tp_size:
        raise ParallelConfigError(
            f"{vocab_size} vocabulary rows are not divisible by {tp_flag} {tp_size}: the word embeddings are "
            f"split by rows. Keep the model config's real vocab_size and pad the rows with "
            f"pretrain.vocab.padded_vocab_size(vocab_size, divisible_by, tp) (the trainer's "
            f"--make_vocab_size_divisible_by, default 128, pads to {padded_vocab_size(vocab_size, 128, tp_size)} here)"
        )
    return world_size // tp_size


def validate_model_for_tp(config, world_size: int, tp_size: int, tp_flag: str = "--tp",
                          make_vocab_size_divisible_by: Optional[int] = 128) -> int:
    """`validate_parallel_config` with the sizes read from a BertConfig-like object; the vocabulary
    is padded as the trainer pads it (None: unpadded, `config.vocab_size` rows)."""
    vocab_rows = getattr(config, "vocab_size", None)
    if vocab_rows is not None and make_vocab_size_divisible_by is not None:
        vocab_rows = padded_vocab_size(vocab_rows, make_vocab_size_divisible_by, tp_size)
    return validate_parallel_config(
        world_size,
        tp_size,
        num_attention_heads=getattr(config, "num_attention_heads", None),
        hidden_size=getattr(config, "hidden_size", None),
        intermediate_size=getattr(config, "intermediate_size", None),
        vocab_size=vocab_rows,
        tp_flag=tp_flag,
    )


def initialize_model_parallel(tp_size: int, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """megatron-core groups: tp ranks are consecutive (inner), dp ranks stride by tp (outer)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs init_distributed() first")
    validate_parallel_config(dist.get_world_size(), tp_size)
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp_size:
            raise RuntimeError(
                f"model parallel already initialised with tp="
                f"{parallel_state.get_tensor_model_parallel_world_size()}, asked for {tp_size}"
            )
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        distributed_timeout_minutes=max(1, int(timeout.total_seconds() // 60)),
        # The extra gloo groups are for CPU-side metadata exchange in megatron's distributed
        # checkpointing, which we do not use; they would double the number of groups.
        create_gloo_process_groups=False,
    )
    logger.info(
        "model parallel: tp=%d dp=%d (tp rank %d, dp rank %d)",
        tp_size, parallel_state.get_data_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
    )


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


class MegatronMPU:
    """The `mpu=` object DeepSpeed expects, forwarding to megatron-core's parallel_state.

    `parallel_state` alone is not enough: DeepSpeed also calls the older `get_model_parallel_*`
    names (model parallel = tensor x pipeline; pipeline is 1 here, so they equal the TP ones).
    """

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()


# --------------------------------------------------------------------------------------------
# Dropout RNG for tensor-parallel regions
# --------------------------------------------------------------------------------------------


class TensorParallelRNG:
    """Dropout RNG for tensor-parallel regions: `fork(device)` gives each TP rank its own stream.

    Inside a split region (attention probabilities of the local heads) each TP rank holds
    different activations, so its dropout mask must be independent, as it would be for those
    heads in a dense model. Outside (hidden states, replicated on every TP rank) every rank must
    drop the same elements, which the default generators give when all TP ranks share a seed.

    The generator forked is the one of the device the region's activations live on: on a GPU,
    dropout and SDPA draw from that device's CUDA generator, not from the CPU one (reseeding the
    CPU generator there would leave every TP rank applying the same masks to different heads).
    Megatron keeps a separate CUDA generator state per rank in its RNG tracker (which fails on
    CPU, and whose state must be saved in checkpoints and replayed by its own activation
    checkpointing). Here the per-rank stream is derived instead: entering `fork()` draws one
    number from the shared CPU generator (the same on every TP rank, so replicated regions stay
    in step; drawn on the CPU so no device synchronisation), seeds the device's generator with it
    mixed with the TP rank, and restores that generator's outer state on exit. The region's masks
    are thus a function of the shared CPU RNG state alone, which torch's activation checkpointing
    saves and restores for recomputation (together with the CUDA state of the inputs' device),
    and which the trainer's checkpoints carry: recomputed and resumed masks are the same.
    """

    # Odd 64-bit constant (golden ratio), so rank r's seed differs from rank r+1's in many bits.
    _MIX = 0x9E3779B97F4A7C15

    def __init__(self, tp_rank: int, device: str = "cpu"):
        self.tp_rank = tp_rank
        self.device = torch.device(device)

    @staticmethod
    def generator(device) -> torch.Generator:
        """The default generator that random ops on `device` draw from."""
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return torch.cuda.default_generators[index]
        if device.type == "cpu":
            return torch.default_generator
        raise ValueError(f"TensorParallelRNG: no default generator for device {device}")

    @contextlib.contextmanager
    def fork(self, device=None):
        """Enter around dropout on TP-split activations living on `device` (default: the
        device given at construction)."""
        base = int(torch.randint(0, 2**62, (1,)).item())
        gen = self.generator(self.device if device is None else device)
        outside = gen.get_state()
        gen.manual_seed((base + self._MIX * (self.tp_rank + 1)) % 2**63)
        try:
            yield
        finally:
            gen.set_state(outside)


# --------------------------------------------------------------------------------------------
# The layer factory (docs/interfaces.md, "layers")
# --------------------------------------------------------------------------------------------


def _mark_partition(param: nn.Parameter, dim: int) -> None:
    # megatron sets these only when it initialises the weight itself; set them always, because
    # tp_partition_dims() (and DeepSpeed's TP-aware grad norm) read them.
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _layer_classes():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class _NoExtraState:
        # megatron layers add an `_extra_state` entry to state_dict (Transformer Engine FP8
        # metadata, always None here) and a load pre-hook that inserts it; without both, the
        # state-dict keys are exactly the HF key tree and strict loading of HF weights works.
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()

    class ColumnLinear(_NoExtraState, ColumnParallelLinear):
        """Column-parallel linear returning one tensor (the output shard), like nn.Linear."""

        def forward(self, x):
            out, _ = super().forward(x)
            return out

    class RowLinear(_NoExtraState, RowParallelLinear):
        """Row-parallel linear returning one tensor (the all-reduced output), like nn.Linear."""

        def forward(self, x):
            out, _ = super().forward(x)
            return out

    class VocabEmbedding(_NoExtraState, VocabParallelEmbedding):
        pass

    return ColumnLinear, RowLinear, VocabEmbedding


class MegatronLayerFactory:
    """The model's tensor-parallel seam on megatron-core layers (tp >= 1).

    Needs `initialize_model_parallel()` first. Parameters keep the names nn.Linear/nn.Embedding
    would have (`weight`, `bias`), so the HF key tree is unchanged; only shapes are per-rank:
    column: weight [out/tp, in], bias [out/tp]; row: weight [out, in/tp], bias [out] (replicated);
    vocab_embedding: weight [num/tp, dim]. The model decides how many heads are local from
    `tp_size`.
    """

    def __init__(self, init_std: float = 0.02, seed: int = 1234, device: Optional[str] = None, params_dtype=torch.float32):
        from megatron.core import parallel_state
        from megatron.core.model_parallel_config import ModelParallelConfig

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("MegatronLayerFactory needs initialize_model_parallel() first")
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cpu = self.device == "cpu"
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            # CPU: megatron's GPU initialisation path allocates on torch.cuda.current_device().
            use_cpu_initialization=on_cpu,
            perform_initialization=True,
            params_dtype=params_dtype,
            # Needs apex's fused_weight_gradient_mlp_cuda, which is absent on PyPI and on CPU.
            gradient_accumulation_fusion=False,
            sequence_parallel=False,
        )
        self.init_method = lambda w: nn.init.normal_(w, mean=0.0, std=init_std)
        if not on_cpu:
            # Megatron's GPU initialisation forks its CUDA RNG tracker, which must be seeded.
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(seed)
        self.rng = TensorParallelRNG(self.tp_rank, self.device)
        self._classes = _layer_classes()

    def column(self, in_f: int, out_f: int, bias: bool = True) -> nn.Module:
        column_cls = self._classes[0]
        layer = column_cls(
            in_f, out_f, config=self.config, init_method=self.init_method, bias=bias,
            gather_output=False,  # gather_output=True allocates on CUDA (FACTS.md) and is not needed
            skip_bias_add=False,
        )
        _mark_partition(layer.weight, 0)
        if bias:
            _mark_partition(layer.bias, 0)
        return layer

    def row(self, in_f: int, out_f: int, bias: bool = True) -> nn.Module:
        row_cls = self._classes[1]
        layer = row_cls(
            in_f, out_f, config=self.config, init_method=self.init_method, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        _mark_partition(layer.weight, 1)
        return layer

    def vocab_embedding(self, num: int, dim: int) -> nn.Module:
        embedding_cls = self._classes[2]
        layer = embedding_cls(num, dim, init_method=self.init_method, config=self.config)
        _mark_partition(layer.weight, 0)
        return layer

    def vocab_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over labels != -100, `logits` holding this rank's vocabulary shard."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        # megatron's kernel works in place on its input (max subtraction, exp): give it a copy so
        # the caller's logits (returned as prediction_logits) stay intact.
        logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
        target = torch.where(keep, labels, torch.zeros_like(labels))
        losses = vocab_parallel_cross_entropy(logits, target)
        # Same convention as the dense factory: no masked token gives 0 (and zero grads), not NaN.
        return (losses * keep).sum() / keep.sum().clamp(min=1)

    def sharded_rng(self, device=None):
        return self.rng.fork(device)


# --------------------------------------------------------------------------------------------
# Full HF weights <-> TP shards
# --------------------------------------------------------------------------------------------

# Which HF BertForPreTraining tensors are split, and along which dim, with the seam used as the
# model uses it (column: dim 0 of weight and bias; row: dim 1 of weight; vocab: dim 0).
_DEFAULT_RULES = [
    (re.compile(r"attention\.self\.(query|key|value)\.(weight|bias)$"), 0),
    (re.compile(r"intermediate\.dense\.(weight|bias)$"), 0),
    (re.compile(r"attention\.output\.dense\.weight$"), 1),
    (re.compile(r"layer\.\d+\.output\.dense\.weight$"), 1),
    (re.compile(r"embeddings\.word_embeddings\.weight$"), 0),
    (re.compile(r"cls\.predictions\.decoder\.(weight|bias)$"), 0),
    (re.compile(r"cls\.predictions\.bias$"), 0),
]


def default_partition_dims(keys: Iterable[str]) -> Dict[str, int]:
    """Split dims for HF BERT keys, from names alone (for checkpoints without a model at hand)."""
    dims = {}
    for key in keys:
        for pattern, dim in _DEFAULT_RULES:
            if pattern.search(key):
                dims[key] = dim
                break
    return dims


def universal_checkpoint_patterns() -> Dict[str, List[str]]:
    """The rules above as DeepSpeed's ds_to_universal reads them (checkpoint metadata; it joins TP
    shards when a run resumes at another dp size). It tries `re.match` on parameter names: one
    pattern for every replicated tensor (whatever no rule splits), one per row-parallel rule;
    tensors matching neither are joined along dim 0 (column-parallel and vocabulary rows)."""
    split = "|".join(pattern.pattern for pattern, _ in _DEFAULT_RULES)
    return {
        "tp_replicated_parameter_patterns": [rf"(?!.*(?:{split})).*"],
        "parameter_with_row_parallelism_patterns": [".*" + pattern.pattern for pattern, dim in _DEFAULT_RULES if dim == 1],
    }


def tp_partition_dims(model: nn.Module) -> Dict[str, int]:
    """{state-dict key: split dim} for every tensor-parallel parameter of a model, tied aliases included.

    Read from the megatron attributes the factory sets, plus the HF name rules for sharded
    parameters the model creates itself (the MLM output bias, sized from the decoder shard).
    """
    dims = {}
    names = []
    for name, param in model.named_parameters(remove_duplicate=False):
        names.append(name)
        if getattr(param, "tensor_model_parallel", False):
            dims[name] = int(param.partition_dim)
    for name, dim in default_partition_dims(names).items():
        dims.setdefault(name, dim)
    return dims


def mark_tensor_parallel_params(model: nn.Module) -> None:
    """Tag every sharded parameter with megatron's attributes (call once after building a TP model).

    DeepSpeed's gradient norm counts a parameter on every TP rank only when it carries
    `tensor_model_parallel`; an untagged shard (cls.predictions.bias) would be counted on TP
    rank 0 only, giving a wrong norm and wrong clipping.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, dim in tp_partition_dims(model).items():
        if not getattr(params[name], "tensor_model_parallel", False):
            _mark_partition(params[name], dim)


def load_full_state_dict(model: nn.Module, full_sd: Mapping[str, torch.Tensor], tp_rank: Optional[int] = None,
                         tp_size: Optional[int] = None) -> None:
    """Load full (HF-layout) weights into a TP model: each rank takes its shard. Strict on keys."""
    if tp_size is None:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    full_sd = dict(full_sd)
    # HF files (hf_io.load_hf_dir) store a tied weight once, under its owner key; the model's
    # state_dict also names the alias, so fill it in before the strict key check.
    for alias, owner in getattr(model, "tied_weights", {}).items():
        if alias not in full_sd and owner in full_sd:
            full_sd[alias] = full_sd[owner]
    shard = shard_state_dict(full_sd, tp_rank, tp_size, tp_partition_dims(model))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shard))
    unexpected = sorted(set(shard) - set(expected))
    if missing or unexpected:
        raise KeyError(f"full state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, tensor in expected.items():
        if tuple(shard[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{key}: shard shape {tuple(shard[key].shape)} != model shape {tuple(tensor.shape)} (tp {tp_size})"
            )
    model.load_state_dict(shard, strict=True)


def shard_state_dict(
    full_sd: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int, partition_dims: Optional[Mapping[str, int]] = None
) -> Dict[str, torch.Tensor]:
    """This rank's shard of full (HF-layout) weights, same keys. Replicated tensors are copied."""
    dims = default_partition_dims(full_sd.keys()) if partition_dims is None else partition_dims
    out = {}
    for key, tensor in full_sd.items():
        dim = dims.get(key)
        if dim is None or tp_size == 1:
            out[key] = tensor.clone()
            continue
        size = tensor.shape[dim]
        if size % tp_size:
            raise ParallelConfigError(
                f"{key}: size {size} along dim {dim} is not divisible by tp {tp_size}"
            )
        out[key] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def unshard_state_dicts(
    shards: List[Mapping[str, torch.Tensor]], partition_dims: Optional[Mapping[str, int]] = None
) -> Dict[str, torch.Tensor]:
    """Full weights from the per-rank shards (index = tp rank). Inverse of `shard_state_dict`."""
    if not shards:
        raise ValueError("unshard_state_dicts needs at least one shard")
    dims = default_partition_dims(shards[0].keys()) if partition_dims is None else partition_dims
    keys = list(shards[0].keys())
    for r, shard in enumerate(shards[1:], 1):
        if set(shard.keys()) != set(keys):
            raise ValueError(f"tp rank {r} holds other keys than tp rank 0: {sorted(set(shard) ^ set(keys))[:5]}")
    out = {}
    for key in keys:
        dim = dims.get(key)
        if dim is None or len(shards) == 1:
            out[key] = shards[0][key].clone()
        else:
            out[key] = torch.cat([s[key] for s in shards], dim=dim)
    return out


def gather_full_state_dict(model: nn.Module, group=None) -> Dict[str, torch.Tensor]:
    """All-gather the TP shards of `model` into full HF-layout CPU tensors on every TP rank.

    Works on a DeepSpeed ZeRO-3 module too: its partitioned parameters are first gathered over
    the data-parallel group (collective: every rank must call this).
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(group)
    dims = tp_partition_dims(model)
    params = list(model.parameters())
    zero3 = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        zero3 = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    out = {}
    with zero3:
        state = model.state_dict()  # inside the ZeRO-3 gather: outside it, parameters are empty
        # A tied alias (the MLM decoder) is the owner's tensor: gather the vocabulary matrix once.
        aliases = {alias: owner for alias, owner in getattr(model, "tied_weights", {}).items()
                   if alias in state and owner in state}
        for key, tensor in state.items():
            if key in aliases:
                out[key] = None  # filled from its owner below (keeps the state-dict key order)
                continue
            tensor = tensor.detach()
            dim = dims.get(key)
            if dim is None or tp_size == 1:
                out[key] = tensor.cpu().clone()
                continue
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            out[key] = torch.cat(parts, dim=dim).cpu()
    for alias, owner in aliases.items():
        # A separate copy, as before: safetensors and callers that edit one key expect no sharing.
        out[alias] = out[owner].clone()
    return out
