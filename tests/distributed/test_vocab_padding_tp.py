"""An odd vocabulary (1001 tokens, like BERT's 30522 not divisible by tp) at tp=4, padded.

Four gloo processes build the model through the trainer's `build_model` (dense init from the
seed, vocabulary padded to 1024 rows, TP shards cut from it) and run a forward/backward pass.
Reference: the UNPADDED dense model built after the same seed in the same process: equal initial
weights, losses and gradients on the real rows; padded rows get no gradient and are never predicted.
"""

from types import SimpleNamespace

import numpy as np
import torch

from tests.distributed._spawn import spawn

VOCAB, TP, SEED = 1001, 4, 1234
TOL = 1e-5


def _tp4_worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import tensor_parallel
    from pretrain.launch import init_distributed
    from pretrain.trainer import build_model
    from pretrain.vocab import padded_vocab_size, resize_vocab
    from tests.distributed.test_tensor_parallel import _gather_grads, dense_model, make_batch, tiny_config

    init_distributed("gloo", use_deepspeed=False)
    tensor_parallel.initialize_model_parallel(TP)
    padded = padded_vocab_size(VOCAB, 128, TP)  # 1024: TP rank 3 holds ids 768..1023, 233 of them real
    res = SimpleNamespace(model_config=tiny_config(vocab_size=VOCAB).to_dict(), padded_vocab_size=padded,
                          cfg=SimpleNamespace(model_config="tiny.json", seed=SEED, activation_checkpointing=False))
    config, model, _ = build_model(res, parallel_state.get_tensor_model_parallel_rank(), TP)
    ref = dense_model(config, seed=SEED)  # unpadded: 1001 rows
    initial = resize_vocab(tensor_parallel.gather_full_state_dict(model), VOCAB)  # the export path: trimmed
    padded_rows = tensor_parallel.gather_full_state_dict(model)["bert.embeddings.word_embeddings.weight"][VOCAB:]

    batch = make_batch(config, seed=1)
    batch["labels"][0, 1] = VOCAB - 1  # the last real id (in the last shard) is a target
    out, out_ref = model(**batch), ref(**batch)
    out.loss.backward()
    out_ref.loss.backward()
    grads = _gather_grads(model)
    grads_ref = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).prediction_logits
        parts = [torch.empty_like(logits) for _ in range(TP)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    full_logits = torch.cat(parts, dim=-1)
    tensor_parallel.destroy_model_parallel()
    return dict(
        shard_rows=model.bert.embeddings.word_embeddings.weight.shape[0],
        bias_rows=model.cls.predictions.bias.shape[0],
        init_equal=set(initial) == set(ref.state_dict())
        and all(torch.equal(initial[k], v) for k, v in ref.state_dict().items()),
        padded_rows_zero=bool(torch.all(padded_rows == 0)),
        loss=out.loss.item(), loss_ref=out_ref.loss.item(), mlm=out.mlm_loss.item(), mlm_ref=out_ref.mlm_loss.item(),
        grad_diff={n: float(np.abs(grads[n][:g.shape[0]] - g).max()) for n, g in grads_ref.items()},
        padded_grad_max={n: float(np.abs(grads[n][g.shape[0]:]).max()) for n, g in grads_ref.items()
                         if grads[n].shape != g.shape},
        logits_width=full_logits.shape[-1],
        logits_diff=(full_logits[..., :VOCAB] - ref(batch["input_ids"], batch["token_type_ids"],
                                                     batch["attention_mask"]).prediction_logits).abs().max().item(),
        argmax_max=int(full_logits.argmax(-1).max()),
    )


def test_odd_vocabulary_at_tp4_is_padded_and_matches_the_unpadded_dense_model():
    results = spawn(_tp4_worker, TP, timeout=300)
    for r in results:
        assert (r["shard_rows"], r["bias_rows"]) == (256, 256)
        assert r["init_equal"] and r["padded_rows_zero"]
        assert r["loss_ref"] > 1.0
        assert abs(r["loss"] - r["loss_ref"]) < TOL and abs(r["mlm"] - r["mlm_ref"]) < TOL
        worst = max(r["grad_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, f"largest gradient difference {worst}"
        assert set(r["padded_grad_max"]) == {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"}
        assert all(v == 0.0 for v in r["padded_grad_max"].values()), r["padded_grad_max"]
        assert r["logits_width"] == 1024 and r["logits_diff"] < TOL
        assert r["argmax_max"] < VOCAB
