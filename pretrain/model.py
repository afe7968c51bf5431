"""BERT (post-LN encoder, MLM + NSP heads) in plain PyTorch, with the HF checkpoint key tree.

Module and parameter names mirror ``transformers``' ``BertForPreTraining`` one to one
(``bert.embeddings.word_embeddings``, ``bert.encoder.layer.N.attention.self.query``, ...,
``cls.predictions.transform.dense``, ``cls.seq_relationship``), so loading or exporting HF
checkpoints is a key-by-key copy (``pretrain/hf_io.py``).

Layers that tensor parallelism splits come from ``pretrain.layers.LayerFactory``; this file knows
only ``layers.tp_size`` (to size the local attention heads) and never touches process groups,
devices or environment variables. Activation checkpointing is toggled from outside with
``model.bert.encoder.gradient_checkpointing = True``; weights are initialised by
``init_weights()``, which the trainer calls after applying parallelism.

Layers work on [B, S, H] (padded) or on the packed real tokens [T, H] (unpadded,
``pretrain/unpad.py``); the attention plan passed down the encoder (``PaddedAttention`` or a
``TokenLayout``) is the only thing that knows which, so no layer branches on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pretrain.layers import IGNORE_INDEX, LayerFactory
from pretrain.unpad import TokenLayout

# Keys HF writes into config.json that do not change the network; accepted and dropped.
_HF_BOOKKEEPING_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "gradient_checkpointing", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "bos_token_id", "eos_token_id",
    "_attn_implementation_autoset", "directionality", "pooler_fc_size",
    "pooler_num_attention_heads", "pooler_num_fc_layers", "pooler_size_per_head", "pooler_type",
    "tokenizer_class", "finetuning_task", "num_labels",
    "version_2_with_negative",  # finetune: a saved SQuAD v2.0 head (abstains when it predicts)
})
# HF keys that are accepted only with the value this encoder-only model implements (a RoBERTa or
# ELECTRA config.json has the same field names but another network, so model_type is checked).
_HF_FIXED_KEYS = {"model_type": "bert", "is_decoder": False, "add_cross_attention": False}

_ACTIVATIONS = {
    "gelu": F.gelu,  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# The fields a pretraining model config must state: a missing one would silently take bert-base's
# value and train (and checkpoint) a model of another shape.
SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings")


@dataclass
class BertConfig:
    """Model shape and regularisation, with HF ``BertConfig`` field names (exports as is)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: Optional[float] = None  # used by fine-tuning heads; None = hidden_dropout_prob
    tie_word_embeddings: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "BertConfig") -> None:
        def fail(msg):
            raise ValueError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                 f"({self.num_attention_heads}); change one of them")
        if self.hidden_act not in _ACTIVATIONS:
            fail(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(f"{name} must be a number in [0, 1), got {value!r}")
        if self.position_embedding_type != "absolute":
            fail(f"position_embedding_type {self.position_embedding_type!r} is not supported; "
                 "only 'absolute' (original BERT) is implemented")
        if self.tie_word_embeddings is not True:
            fail("tie_word_embeddings must be true: the MLM decoder always shares the word embeddings")
        if not 0 <= self.pad_token_id < self.vocab_size:
            fail(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")

    @classmethod
    def from_dict(cls, values: dict, source: str = "BertConfig", required: tuple = ()) -> "BertConfig":
        """Fields missing from `values` take bert-base's defaults, except those in `required`."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object of BertConfig fields")
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"{source}: needs integer field(s) {missing} (a model config states the model's shape)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        unknown = []
        for key, value in values.items():
            if key in fields:
                kwargs[key] = value
            elif key in _HF_FIXED_KEYS:
                if value != _HF_FIXED_KEYS[key]:
                    raise ValueError(f"{source}: {key}={value!r} is not supported by this "
                                     f"encoder-only BERT; set it to {_HF_FIXED_KEYS[key]!r}"
                                     " (or remove the key)")
            elif key not in _HF_BOOKKEEPING_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; valid keys are "
                             f"{sorted(fields)} (spelling follows transformers' BertConfig)")
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(config, f.name, kwargs.get(f.name, default))
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                values = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"model config {path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config {path}: not valid JSON ({exc})") from None
        return cls.from_dict(values, source=f"model config {path}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BertModelOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor]
    hidden_states: Optional[tuple]  # embeddings output, then every layer's output (HF order)


class PreTrainingOutput(NamedTuple):
    loss: Optional[torch.Tensor]  # mlm_loss + nsp_loss (whichever labels were given)
    mlm_loss: Optional[torch.Tensor]
    nsp_loss: Optional[torch.Tensor]
    # [n_masked, V] with labels, else [B, S, V] (V / tp shards); V = the padded vocabulary, whose
    # padded ids hold the dtype's lowest value
    prediction_logits: torch.Tensor
    seq_relationship_logits: torch.Tensor  # [B, 2] ([pairs, 2] with cls_positions)
    mlm_labels: Optional[torch.Tensor]  # [n_masked] targets matching prediction_logits rows


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory, vocab_rows: int):
        super().__init__()
        with _keep_rng_state():
            self.word_embeddings = layers.vocab_embedding(vocab_rows, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # Capital L as in the TF original, so checkpoint keys stay "LayerNorm.weight".
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, layout: Optional[TokenLayout] = None):
        """[B, S] ids -> [B, S, H]; with ``layout``, only its real tokens -> [T, H]."""
        if layout is None:
            seq_length = input_ids.shape[1]
            positions = torch.arange(seq_length, device=input_ids.device)
        else:
            input_ids, token_type_ids = layout.unpad(input_ids), layout.unpad(token_type_ids)
            seq_length = layout.max_position + 1
            positions = layout.position_ids
        if seq_length > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {seq_length} exceeds max_position_embeddings "
                             f"({self.position_embeddings.num_embeddings})")
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = hidden // config.num_attention_heads
        # Column-parallel q/k/v split the heads across TP ranks; this rank holds num_heads / tp.
        self.num_heads = config.num_attention_heads // layers.tp_size
        self.query = layers.column(hidden, hidden)
        self.key = layers.column(hidden, hidden)
        self.value = layers.column(hidden, hidden)
        self.dropout_prob = config.attention_probs_dropout_prob
        self._sharded_rng = layers.sharded_rng

    def forward(self, hidden_states, attention):
        """``hidden_states`` [B, S, H] or packed [T, H]; ``attention`` the matching plan
        (``PaddedAttention`` or ``TokenLayout``), which runs the softmax over each sequence."""
        shape = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        query = self.query(hidden_states).view(shape)
        key = self.key(hidden_states).view(shape)
        value = self.value(hidden_states).view(shape)
        dropout = self.dropout_prob if self.training else 0.0
        # Attention probabilities live on this rank's heads only: their dropout mask must differ
        # across TP ranks, hence the sharded RNG region. Entered only when dropout runs: the
        # region draws from the shared RNG, and an eval pass must not shift training's masks.
        # The region forks the generator of the device the activations are on (CUDA's for a GPU
        # run: SDPA's dropout draws from it there, not from the CPU generator).
        with self._sharded_rng(query.device) if dropout > 0 else contextlib.nullcontext():
            context = attention.attend(query, key, value, dropout)
        return context.reshape(*hidden_states.shape[:-1], self.num_heads * self.head_dim)


class PaddedAttention:
    """Attention on the padded [B, S, heads, d] layout with an additive [B, 1, 1, S] key bias."""

    def __init__(self, bias: Optional[torch.Tensor]):
        self.bias = bias

    def attend(self, query, key, value, dropout_p: float = 0.0):
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        bias = self.bias
        if bias is not None and bias.dtype != query.dtype:
            # Under autocast q/k/v are bf16/fp16 while the bias was built in fp32; SDPA wants
            # one dtype, and the clamp keeps "masked" finite (fp32's min overflows fp16).
            bias = bias.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout_p)
        return context.transpose(1, 2)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.dense = layers.row(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.self = BertSelfAttention(config, layers)  # "self" is the HF key name
        self.output = BertSelfOutput(config, layers)

    def forward(self, hidden_states, attention, rows=None):
        context = self.self(hidden_states, attention)
        if rows is not None:
            # Every token is a key/value, but only `rows` (flat B*S indices) are read after this
            # layer: the output projection, LayerNorm and feed-forward skip all other tokens.
            # (Packed [T, C] inputs: `rows` index the packed tokens.)
            context = context.reshape(-1, context.shape[-1]).index_select(0, rows)
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, rows)
        return self.output(context, hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.dense = layers.column(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states):
        return self.act(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.dense = layers.row(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.attention = BertAttention(config, layers)
        self.intermediate = BertIntermediate(config, layers)
        self.output = BertOutput(config, layers)

    def forward(self, hidden_states, attention, rows=None):
        attention_output = self.attention(hidden_states, attention, rows)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, layers) for _ in range(config.num_hidden_layers))
        # Toggled by the trainer; recomputes each layer in backward instead of storing activations.
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention, output_hidden_states=False, output_rows=None):
        all_hidden = [hidden_states] if output_hidden_states else None
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            rows = output_rows if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention, rows, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attention, rows)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        return hidden_states, (tuple(all_hidden) if output_hidden_states else None)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(self.dense(hidden_states[:, 0]))


def _attention_bias(attention_mask, dtype):
    """[B, S] 1/0 padding mask -> additive [B, 1, 1, S] bias in the activation dtype.

    An additive float mask of the query dtype is what SDPA's fused CPU/memory-efficient kernels
    take without conversion; finfo.min instead of -inf keeps a fully padded row finite.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq] (1 = token, 0 = padding), "
                         f"got shape {tuple(attention_mask.shape)}")
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class BertModel(nn.Module):
    def __init__(self, config: BertConfig, layers: Optional[LayerFactory] = None,
                 add_pooling_layer: bool = True, padded_vocab_size: Optional[int] = None):
        """``padded_vocab_size``: rows of the word embeddings (and of the tied MLM decoder), at
        least ``config.vocab_size`` and divisible by tp (``pretrain.vocab.padded_vocab_size``);
        None = exactly ``config.vocab_size``. Rows past the vocabulary stay zero, unused."""
        super().__init__()
        layers = layers if layers is not None else LayerFactory()
        if config.num_attention_heads % layers.tp_size:
            raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be divisible "
                             f"by the tensor-parallel size ({layers.tp_size})")
        rows = config.vocab_size if padded_vocab_size is None else padded_vocab_size
        if rows < config.vocab_size or rows % layers.tp_size:
            raise ValueError(f"padded_vocab_size {rows} must be >= vocab_size ({config.vocab_size}) and "
                             f"divisible by the tensor-parallel size ({layers.tp_size}); use "
                             "pretrain.vocab.padded_vocab_size(vocab_size, divisible_by, tp)")
        self.config = config
        self.padded_vocab_size = rows
        self.embeddings = BertEmbeddings(config, layers, rows)
        self.encoder = BertEncoder(config, layers)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        # Unpadded attention: "auto" (CPU: bucketed SDPA, CUDA: nested-tensor varlen SDPA),
        # "bucketed" or "nested" (``pretrain/unpad.py``).
        self.attention_backend = "auto"

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                output_hidden_states=False, output_rows=None, unpad: bool = False,
                layout: Optional[TokenLayout] = None) -> BertModelOutput:
        """``output_rows`` (optional, int64 indices into the flattened [B * S] tokens): the last
        layer computes only these rows; ``last_hidden_state`` is then [len(rows), H] and
        ``pooler_output`` None (the caller pools the [CLS] rows it asked for).

        ``unpad`` (with an ``attention_mask``), or an explicit ``layout`` (e.g. of packed rows):
        every layer runs on the packed real tokens only (``pretrain/unpad.py``), with the padded
        model's numbers at real tokens (up to float rounding; dropout masks differ).
        ``last_hidden_state`` and ``hidden_states`` come back as [B, S, H] with zeros at padding
        where the padded model has values nobody should read (hence off by default: this
        module's outputs then equal transformers' at every position); ``output_rows`` must be
        real tokens. With a layout (built for ``unpad`` or passed), a batch with a left-padded
        or all-padding row runs padded when the [CLS] rows are read (``output_rows`` or the
        pooler), so those keep BERT's meaning.
        ``self.attention_backend`` decides the attention of every layout, a passed one too."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if layout is None and unpad and attention_mask is not None:
            layout = TokenLayout.from_attention_mask(attention_mask)
        if layout is not None and not layout.first_column_real and \
                (output_rows is not None or self.pooler is not None):
            # A left-padded or all-padding row: its [CLS] position (what the pooler and the
            # classification heads read, as in BERT) is padding, which only the padded encoder
            # computes; unpadding is an optimisation, so run that rather than fail (on CUDA the
            # failure would be a device-side assert that poisons the context).
            layout = None
        if layout is None:
            hidden = self.embeddings(input_ids, token_type_ids)
            attention = PaddedAttention(_attention_bias(attention_mask, hidden.dtype))
            rows = output_rows
        else:
            layout = layout.with_backend(self.attention_backend)  # one knob, whoever built the layout
            hidden = self.embeddings(input_ids, token_type_ids, layout)
            attention = layout
            rows = None if output_rows is None else layout.to_packed(output_rows)
        hidden, all_hidden = self.encoder(hidden, attention, output_hidden_states, rows)
        if layout is not None:
            if all_hidden is not None:
                # with output_rows the last layer's output is those rows already, as when padded
                keep = len(all_hidden) - (output_rows is not None)
                all_hidden = tuple(layout.pad(h) if i < keep else h for i, h in enumerate(all_hidden))
            if output_rows is None:
                pooled = None
                if self.pooler is not None:
                    cls_rows = layout.to_packed(torch.arange(0, layout.batch * layout.seq, layout.seq,
                                                             device=hidden.device))
                    pooled = self.pooler(hidden.index_select(0, cls_rows)[:, None])
                return BertModelOutput(layout.pad(hidden), pooled, all_hidden)
        pooled = None
        if self.pooler is not None and output_rows is None:
            pooled = self.pooler(hidden)
        return BertModelOutput(hidden, pooled, all_hidden)

    def init_weights(self) -> None:
        _init_weights(self, self.config.initializer_range, self.embeddings.word_embeddings, self.config.vocab_size)
        _zero_padding_row(self.embeddings.word_embeddings, self.config.pad_token_id)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        return self.LayerNorm(self.act(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory, vocab_rows: Optional[int] = None,
                 real_rows: Optional[int] = None):
        """``vocab_rows``: the (padded) vocabulary size; ``real_rows``: how many of this rank's
        decoder rows are real tokens (default all), the rest are padding and never predicted."""
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The weight is replaced by the word embeddings (tied) in BertForPreTraining; a column
        # layer takes the replicated hidden states and yields this rank's vocabulary slice,
        # which is exactly the slice of the vocab-parallel embedding it shares.
        with _keep_rng_state():
            self.decoder = layers.column(config.hidden_size, vocab_rows or config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.decoder.weight.shape[0]))
        self.real_rows = self.decoder.weight.shape[0] if real_rows is None else real_rows

    def forward(self, hidden_states):
        logits = self.decoder(self.transform(hidden_states))
        # Cast the fp32 bias so that autocast logits stay in bf16/fp16 (half the memory of a
        # promoted [tokens, vocab] tensor); the loss upcasts where it matters.
        logits = logits + self.bias.to(logits.dtype)
        if self.real_rows < logits.shape[-1]:
            # Padded vocabulary ids must never win: the most negative logit has probability
            # exactly 0 in the loss's softmax (so the loss and gradients are the unpadded
            # model's, the padded rows get none) and never is an argmax.
            logits[..., self.real_rows:] = torch.finfo(logits.dtype).min
        return logits


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, layers: LayerFactory, vocab_rows: Optional[int] = None,
                 real_rows: Optional[int] = None):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, layers, vocab_rows, real_rows)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(nn.Module):
    # State-dict keys that alias another parameter (not stored separately in HF checkpoints).
    tied_weights = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: BertConfig, layers: Optional[LayerFactory] = None,
                 padded_vocab_size: Optional[int] = None):
        """``padded_vocab_size``: see ``BertModel``; the decoder and ``cls.predictions.bias``
        get the same rows as the word embeddings, and padded ids get the lowest logit."""
        super().__init__()
        layers = layers if layers is not None else LayerFactory()
        self.config = config
        self._layers = layers
        self.bert = BertModel(config, layers, padded_vocab_size=padded_vocab_size)
        self.padded_vocab_size = self.bert.padded_vocab_size
        real_rows = _real_vocab_rows(self.bert.embeddings.word_embeddings, config.vocab_size)
        self.cls = BertPreTrainingHeads(config, layers, self.padded_vocab_size, real_rows)
        self.tie_weights()
        # With labels, run the encoder unpadded (every output then is a real token's: masked
        # positions and [CLS]). Toggled from outside like ``gradient_checkpointing``; off by
        # default because building the layout from a GPU mask waits for the device (``nonzero``),
        # which a caller avoids by passing ``layout`` built on the host (see ``forward``).
        # Without labels the full [B, S, V] logits stay padded (transformers' at every position).
        self.unpad = False

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None,
                next_sentence_label=None, masked_positions=None,
                layout: Optional[TokenLayout] = None, cls_positions=None) -> PreTrainingOutput:
        """``masked_positions`` (optional, with ``labels``): the flat [B * S] indices of
        ``labels != -100`` in row-major order, computed by the caller where the labels are still on
        the host. Without it the model finds them itself with ``nonzero``, which on a GPU waits for
        every queued kernel (the output size depends on the data) once per micro-batch.

        ``layout`` (optional, with ``labels``): the batch's ``TokenLayout``, built by the caller
        on the host for the same reason (``TokenLayout.from_attention_mask(mask).to(device)``);
        the encoder then runs unpadded whatever ``self.unpad`` says. Without it and with
        ``self.unpad`` the model builds it from ``attention_mask``.

        ``cls_positions`` (optional, with ``labels``): the flat [B * S] index of each NSP pair's
        [CLS], in the order of ``next_sentence_label``, for rows that pack several pairs
        (``pretrain/data.py``; pass the packed rows' ``layout`` too). Default: column 0 of every
        row (one pair per row)."""
        mlm_loss = nsp_loss = mlm_labels = None
        if labels is not None:
            # Sparse prediction: only the [CLS] rows (NSP) and the masked rows (~15% of tokens,
            # in the row-major order of labels != -100) leave the last layer, and only the
            # masked ones go through the MLM transform and the vocabulary-sized decoder.
            batch, seq = input_ids.shape
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, with -100 where no token is masked")
            flat_labels = labels.reshape(-1)
            if masked_positions is None:
                masked = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
            else:
                masked = masked_positions.reshape(-1).to(device=flat_labels.device, dtype=torch.long)
            if cls_positions is None:
                cls_rows = torch.arange(0, batch * seq, seq, device=masked.device)
            else:
                cls_rows = cls_positions.reshape(-1).to(device=masked.device, dtype=torch.long)
            pairs = cls_rows.numel()
            rows = torch.cat([cls_rows, masked])
            hidden = self.bert(input_ids, token_type_ids, attention_mask, output_rows=rows,
                               unpad=self.unpad, layout=layout).last_hidden_state
            pooled_output = self.bert.pooler(hidden[:pairs, None])
            mlm_labels = flat_labels.index_select(0, masked)
            prediction_logits = self.cls.predictions(hidden[pairs:])
            mlm_loss = self._layers.vocab_cross_entropy(prediction_logits, mlm_labels)
        else:
            sequence_output, pooled_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
            prediction_logits = self.cls.predictions(sequence_output)
        nsp_logits = self.cls.seq_relationship(pooled_output)
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.reshape(-1))

        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, prediction_logits, nsp_logits, mlm_labels)

    def init_weights(self) -> None:
        embeddings = self.bert.embeddings.word_embeddings
        _init_weights(self, self.config.initializer_range, embeddings, self.config.vocab_size)
        _zero_padding_row(embeddings, self.config.pad_token_id)


@torch.no_grad()
def _init_weights(model: nn.Module, std: float, word_embeddings: nn.Module, vocab_size: int) -> None:
    """HF's BERT init: N(0, initializer_range) for weight matrices and embeddings, zero biases,
    LayerNorm weight 1 / bias 0. Works on TP shards too (each rank fills its own slice).

    Padded vocabulary rows of ``word_embeddings`` are zeroed, and only the real rows are drawn,
    in place of the whole matrix: the generator then yields the unpadded model's numbers for
    every parameter, so padded and unpadded models built after one seed have equal weights."""
    real_rows = _real_vocab_rows(word_embeddings, vocab_size)
    seen = set()
    for name, param in model.named_parameters():  # shared (tied) parameters appear once
        if id(param) in seen:
            continue
        seen.add(id(param))
        if ".LayerNorm." in f".{name}":
            if name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        elif name.endswith("bias"):
            param.zero_()
        elif param is word_embeddings.weight and real_rows < param.shape[0]:
            param[:real_rows].normal_(mean=0.0, std=std)
            param[real_rows:].zero_()
        else:
            param.normal_(mean=0.0, std=std)


def _keep_rng_state():
    """Around building the vocabulary-sized layers: their construction-time values are replaced by
    ``init_weights`` (or loaded weights), but drawing them would advance the generator by an amount
    that depends on the padded row count, so a padded model's ``init_weights`` would then draw
    other numbers than an unpadded one built after the same seed."""
    return torch.random.fork_rng(devices=[])


def _real_vocab_rows(embedding: nn.Module, vocab_size: int) -> int:
    """How many rows of a (vocab-parallel) word-embedding shard are real token ids; the shard
    holds ids ``[vocab_start_index, ...)`` (megatron's attribute; 0 for a dense ``nn.Embedding``)
    and ids >= ``vocab_size`` are padding (``pretrain/vocab.py``)."""
    start = getattr(embedding, "vocab_start_index", 0)
    return max(0, min(embedding.weight.shape[0], vocab_size - start))


@torch.no_grad()
def _zero_padding_row(embedding: nn.Module, pad_token_id: int) -> None:
    """HF builds the word embeddings with ``padding_idx`` and zeroes that row at init. A
    vocab-parallel shard holds rows ``[vocab_start_index, vocab_start_index + rows)`` (megatron's
    attribute; 0 for a dense ``nn.Embedding``): only the shard owning the [PAD] row zeroes it."""
    start = getattr(embedding, "vocab_start_index", 0)
    if start <= pad_token_id < start + embedding.weight.shape[0]:
        embedding.weight[pad_token_id - start].zero_()


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied decoder weight counted once, as transformers does)."""
    return sum(p.numel() for p in model.parameters())
