"""Tensor parallelism (pretrain/tensor_parallel.py: megatron-core layers through the model's seam)
against a dense model, plus the checks that run before any group starts.

Reference: the same BertForPreTraining built with the dense tp=1 factory, loaded from the same
full weights, run in the same process on the same batch. tp=2 must give the same losses, the same
logits and, once the shards are gathered, the same gradients.
"""

import os

import numpy as np
import pytest
import torch

from pretrain.launch import ParallelConfigError
from pretrain.tensor_parallel import validate_model_for_tp, validate_parallel_config
from tests.distributed._spawn import spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5


def tiny_config(**overrides):
    from pretrain.model import BertConfig

    values = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def make_batch(config, batch=4, seq=16, seed=0):
    """A pretraining batch with padding, ~25% masked positions and both NSP classes."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    token_type_ids = (torch.arange(seq)[None, :] >= (lengths[:, None] // 2)).long() * attention_mask
    masked = (torch.rand(batch, seq, generator=g) < 0.25) & attention_mask.bool()
    masked[:, 1] = True  # at least one target per row
    labels = torch.where(masked, torch.randint(0, config.vocab_size, (batch, seq), generator=g), -100)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                labels=labels, next_sentence_label=nsp)


def dense_model(config, seed=0):
    from pretrain.model import BertForPreTraining

    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    model.init_weights()
    return model


def build_tp_model(config, full_sd):
    from pretrain import tensor_parallel
    from pretrain.model import BertForPreTraining

    factory = tensor_parallel.MegatronLayerFactory(init_std=config.initializer_range, seed=1234)
    model = BertForPreTraining(config, layers=factory)
    tensor_parallel.mark_tensor_parallel_params(model)
    tensor_parallel.load_full_state_dict(model, full_sd)
    return model, factory


def _gather_grads(model):
    """Full gradients of a TP model, keyed like its deduplicated named_parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.tensor_parallel import tp_partition_dims

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    dims = tp_partition_dims(model)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if name in dims and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=dims[name])
        out[name] = g.numpy().copy()
    return out


def _tp_vs_dense_worker(rank, world_size, tp):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import tensor_parallel
    from pretrain.launch import init_distributed

    init_distributed("gloo")
    tensor_parallel.initialize_model_parallel(tp)
    config = tiny_config()
    ref = dense_model(config)
    full_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    model, factory = build_tp_model(config, full_sd)
    batch = make_batch(config, seed=1)

    out = model(**batch)
    out.loss.backward()
    out_ref = ref(**batch)
    out_ref.loss.backward()

    # Logits without labels: [B, S, V/tp] per rank, gathered along the vocabulary.
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).prediction_logits
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
        logits_ref = ref(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).prediction_logits

    grads = _gather_grads(model)
    grads_ref = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
    gathers = []
    all_gather = dist.all_gather
    dist.all_gather = lambda *a, **k: (gathers.append(1), all_gather(*a, **k))[1]
    try:
        exported = tensor_parallel.gather_full_state_dict(model)
    finally:
        dist.all_gather = all_gather
    result = dict(
        export_gathers=len(gathers),
        loss=out.loss.item(), mlm=out.mlm_loss.item(), nsp=out.nsp_loss.item(),
        loss_ref=out_ref.loss.item(), mlm_ref=out_ref.mlm_loss.item(), nsp_ref=out_ref.nsp_loss.item(),
        logits_diff=(logits - logits_ref).abs().max().item(),
        grad_diff={n: float(np.abs(grads[n] - grads_ref[n]).max()) for n in grads_ref},
        grad_scale=max(float(np.abs(g).max()) for g in grads_ref.values()),
        shard_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
        export_equal=all(torch.equal(exported[k], full_sd[k]) for k in full_sd) and set(exported) == set(full_sd),
        partition_dims=tensor_parallel.tp_partition_dims(model),
    )
    result["hf_dir_logits_diff"], result["hf_dir_has_decoder_key"] = _load_from_hf_dir(config, ref, batch)
    result.update(_lamb_step(model, ref))
    result.update(_dropout_checks(config, full_sd, factory, batch))
    tensor_parallel.destroy_model_parallel()
    return result


def _load_from_hf_dir(config, ref, batch):
    """An HF directory (decoder weight stored once, under the embeddings) loads into a TP model,
    whose gathered logits equal the dense model's."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.hf_io import load_hf_dir, save_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_dir(ref, config, tmp)
        _, hf_sd = load_hf_dir(tmp)
    model, _ = build_tp_model(config, hf_sd)
    args = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model.eval()(*args).prediction_logits
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        diff = (torch.cat(parts, dim=-1) - ref.eval()(*args).prediction_logits).abs().max().item()
    ref.train()
    return diff, "cls.predictions.decoder.weight" in hf_sd


def _lamb_step(model, ref):
    """One LAMB step of each variant on the TP model (TP-aware norms) and on the dense model,
    from equal grads."""
    from megatron.core import parallel_state

    from pretrain import tensor_parallel
    from pretrain.optim import build_optimizer

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for variant in ("clamped", "nvidia"):
        opt = build_optimizer(model, "lamb", lr=0.05, tp_group=group, variant=variant)
        opt_ref = build_optimizer(ref, "lamb", lr=0.05, variant=variant)
        opt.step()
        opt_ref.step()
        after = tensor_parallel.gather_full_state_dict(model)
        ref_sd = ref.state_dict()
        ratios = [float(s["last_trust_ratio"]) for s in opt_ref.state.values()]
        prefix = "lamb" if variant == "clamped" else "lamb_nvidia"
        out[f"{prefix}_weight_diff"] = max((after[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
        out[f"{prefix}_ratio_spread"] = max(ratios) / min(ratios)
        out[f"{prefix}_ratios_at_1"] = sum(r == 1.0 for r in ratios)
    return out


def _dropout_checks(config, full_sd, factory, batch):
    """With dropout on: TP ranks agree on replicated regions, differ inside split ones, and
    activation checkpointing recomputes the same masks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.model import BertForPreTraining

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)

    def gathered(x):
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return parts

    # The fork: a different stream per TP rank inside, the shared stream untouched outside.
    torch.manual_seed(7)
    with factory.sharded_rng():
        inside = torch.rand(4)
    outside = torch.rand(4)
    inside_parts, outside_parts = gathered(inside), gathered(outside)

    drop_config = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model, _ = build_tp_model(drop_config, full_sd)
    model.train()

    def loss_and_grads(checkpointing):
        model.zero_grad()
        model.bert.encoder.gradient_checkpointing = checkpointing
        torch.manual_seed(11)
        out = model(**batch)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    model.eval()
    with torch.no_grad():
        loss_eval = model(**batch).loss
    return dict(
        fork_differs_across_tp=not torch.equal(inside_parts[0], inside_parts[1]),
        outside_same_across_tp=torch.equal(outside_parts[0], outside_parts[1]),
        outside_matches_plain_stream=torch.equal(outside, _one_draw_then_rand(7)),
        dropout_loss_same_across_tp=torch.equal(*gathered(loss_plain.reshape(1))),
        dropout_changed_loss=abs(loss_plain.item() - loss_eval.item()) > 1e-4,
        ckpt_loss_diff=(loss_plain - loss_ckpt).abs().item(),
        ckpt_grad_diff=max((a - b).abs().max().item() for a, b in zip(grads_plain, grads_ckpt)),
    )


def _one_draw_then_rand(seed):
    # What the shared stream looks like after one fork: exactly one integer drawn from it.
    torch.manual_seed(seed)
    torch.randint(0, 2**62, (1,))
    return torch.rand(4)


@pytest.fixture(scope="module")
def tp2_results():
    return spawn(_tp_vs_dense_worker, 2, args=(2,), timeout=180)


def test_tp2_losses_match_dense(tp2_results):
    for r in tp2_results:
        assert r["loss_ref"] > 1.0  # a real loss, not a degenerate batch
        assert abs(r["mlm"] - r["mlm_ref"]) < TOL
        assert abs(r["nsp"] - r["nsp_ref"]) < TOL
        assert abs(r["loss"] - r["loss_ref"]) < TOL
        assert r["logits_diff"] < TOL


def test_tp2_loads_an_hf_directory(tp2_results):
    for r in tp2_results:
        assert not r["hf_dir_has_decoder_key"]  # the HF layout: tied decoder not stored
        assert r["hf_dir_logits_diff"] < TOL


def test_tp2_gathered_gradients_match_dense(tp2_results):
    for r in tp2_results:
        assert r["grad_scale"] > 1e-3
        worst = max(r["grad_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, f"largest gradient difference {worst}"
    # every parameter of the dense model has a gathered counterpart
    assert len(tp2_results[0]["grad_diff"]) == len(dict(dense_model(tiny_config()).named_parameters()))


def test_tp2_shards_keep_hf_names_and_split_shapes(tp2_results):
    shapes = tp2_results[0]["shard_shapes"]
    full = {k: tuple(v.shape) for k, v in dense_model(tiny_config()).state_dict().items()}
    assert set(shapes) == set(full)
    layer = "bert.encoder.layer.0."
    assert shapes[layer + "attention.self.query.weight"] == (16, 32)
    assert shapes[layer + "attention.self.query.bias"] == (16,)
    assert shapes[layer + "attention.output.dense.weight"] == (32, 16)
    assert shapes[layer + "attention.output.dense.bias"] == (32,)
    assert shapes[layer + "intermediate.dense.weight"] == (32, 32)
    assert shapes[layer + "output.dense.weight"] == (32, 32)
    assert shapes["bert.embeddings.word_embeddings.weight"] == (64, 32)
    assert shapes["cls.predictions.decoder.weight"] == (64, 32)
    assert shapes["cls.predictions.bias"] == (64,)
    assert shapes["bert.embeddings.position_embeddings.weight"] == full["bert.embeddings.position_embeddings.weight"]


def test_tp2_export_gathers_back_the_full_weights(tp2_results):
    assert all(r["export_equal"] for r in tp2_results)
    # One collective per sharded tensor: the tied decoder alias is copied, not gathered again.
    sharded = set(tp2_results[0]["partition_dims"]) - {"cls.predictions.decoder.weight"}
    assert all(r["export_gathers"] == len(sharded) for r in tp2_results)


def test_name_rules_agree_with_the_model_layout(tp2_results):
    from pretrain.tensor_parallel import default_partition_dims

    dims = tp2_results[0]["partition_dims"]
    # Written out by hand from the megatron layer types: column layers split dim 0 (weight and
    # bias), row layers split the weight's dim 1 (bias replicated), vocab-parallel dim 0.
    expected = {"bert.embeddings.word_embeddings.weight": 0, "cls.predictions.decoder.weight": 0,
                "cls.predictions.bias": 0}
    for n in range(tiny_config().num_hidden_layers):
        layer = f"bert.encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "intermediate.dense"):
            expected[layer + name + ".weight"] = expected[layer + name + ".bias"] = 0
        expected[layer + "attention.output.dense.weight"] = expected[layer + "output.dense.weight"] = 1
    assert dims == expected
    full_keys = dense_model(tiny_config()).state_dict().keys()
    assert default_partition_dims(full_keys) == dims


def test_universal_checkpoint_patterns_agree_with_the_model_layout(tp2_results):
    """The rules as written into checkpoints for DeepSpeed's ds_to_universal (resume at another dp
    size), applied as it applies them: `re.match`, at most one hit per list; replicated -> one
    copy, row-parallel -> dim 1, anything else -> dim 0. Every pattern must be used (its strict
    mode fails on an unused one)."""
    import re

    from pretrain import checkpoint as ckpt

    info = ckpt.universal_info()
    replicated, row = info["tp_replicated_parameter_patterns"], info["parameter_with_row_parallelism_patterns"]
    dims = tp2_results[0]["partition_dims"]
    used = set()
    names = [name for name, _ in dense_model(tiny_config()).named_parameters(remove_duplicate=False)]
    for name in names:
        hits = {kind: [p for p in patterns if re.match(p, name)] for kind, patterns in
                (("replicated", replicated), ("row", row))}
        assert all(len(h) <= 1 for h in hits.values()), (name, hits)
        used.update(hits["replicated"] + hits["row"])
        joined_along = None if hits["replicated"] else 1 if hits["row"] else 0
        assert joined_along == dims.get(name), name
    assert used == set(replicated + row)
    assert any(name not in dims for name in names) and set(dims.values()) == {0, 1}


def test_lamb_on_tp_shards_uses_full_weight_norms(tp2_results):
    for r in tp2_results:
        assert r["lamb_ratio_spread"] > 2  # trust ratios really differ between tensors
        assert r["lamb_weight_diff"] < TOL
        # NVIDIA's variant: ratio 1 on every bias / LayerNorm tensor, unclamped elsewhere.
        assert r["lamb_nvidia_ratio_spread"] > 2 and r["lamb_nvidia_ratios_at_1"] > r["lamb_ratios_at_1"]
        assert r["lamb_nvidia_weight_diff"] < TOL


def test_sharded_rng_streams(tp2_results):
    for r in tp2_results:
        assert r["fork_differs_across_tp"]
        assert r["outside_same_across_tp"]
        assert r["outside_matches_plain_stream"]


def test_dropout_with_tp_keeps_ranks_in_step_and_survives_activation_checkpointing(tp2_results):
    for r in tp2_results:
        assert r["dropout_changed_loss"]
        assert r["dropout_loss_same_across_tp"]
        assert r["ckpt_loss_diff"] < 1e-6
        assert r["ckpt_grad_diff"] < 1e-6


def test_shard_unshard_roundtrip_without_processes():
    from pretrain.tensor_parallel import shard_state_dict, unshard_state_dicts

    full = dense_model(tiny_config()).state_dict()
    for tp in (1, 2, 4):
        shards = [shard_state_dict(full, r, tp) for r in range(tp)]
        back = unshard_state_dicts(shards)
        assert set(back) == set(full)
        assert all(torch.equal(back[k], full[k]) for k in full)
    q = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(shard_state_dict(full, 1, 4)[q], full[q][8:16])
    o = "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(shard_state_dict(full, 1, 2)[o], full[o][:, 32:])


# ---------------------------------------------------------------- validation before any group starts


def test_validation_messages_say_what_to_change():
    assert validate_parallel_config(8, 2, num_attention_heads=16, hidden_size=1024,
                                    intermediate_size=4096, vocab_size=30522) == 4
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible by --tp 4"):
        validate_parallel_config(6, 4)
    with pytest.raises(ParallelConfigError, match="num_attention_heads 12 is not divisible by --tp 8"):
        validate_parallel_config(8, 8, num_attention_heads=12)
    # Unpadded rows: the message points at the padding helper and names the padded size.
    with pytest.raises(ParallelConfigError, match=r"30522 vocabulary rows are not divisible by --tp 4.*"
                                                  r"padded_vocab_size.*pads to 30720"):
        validate_parallel_config(4, 4, num_attention_heads=16, vocab_size=30522)
    with pytest.raises(ParallelConfigError, match="intermediate_size 100"):
        validate_parallel_config(8, 8, intermediate_size=100)
    with pytest.raises(ParallelConfigError, match="--tp must be a positive integer"):
        validate_parallel_config(4, 0)


def test_validation_reads_the_model_config():
    from pretrain.model import BertConfig

    large = BertConfig.from_json_file(os.path.join(REPO, "configs", "bert-large.json"))
    assert validate_model_for_tp(large, world_size=4, tp_size=2) == 2
    # 30522 rows do not split 8 ways; padded as the trainer pads them (128 x 8 -> 30720) they do.
    assert validate_model_for_tp(large, world_size=8, tp_size=8) == 1
    with pytest.raises(ParallelConfigError, match="vocabulary rows"):
        validate_model_for_tp(large, world_size=8, tp_size=8, make_vocab_size_divisible_by=None)
