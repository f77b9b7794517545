"""Issue 18: the trainer on your model: presets, Hugging Face model directories (LLaMA, Mistral, Qwen2, Qwen3),
your own factory; the model's identity; mixed precision; gradient accumulation; export for from_pretrained."""

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hf_models import FAMILIES, write_model_dir
from trainer_runs import check_replicas_agree, make_config, relative_difference, run

from mecefo.checkpoint import list_checkpoints, read_checkpoint
from mecefo.config import ConfigError, TrainConfig
from mecefo.data import Batches, prepare_corpus
from mecefo.membership import plan_step
from mecefo.model import run_work, shard_loss
from mecefo.models import (DIRECTORY, PRESET, build_model, check_model, model_identity, resolve_model_source)
from mecefo.neighbor import neighbor_path
from mecefo.report import read_metrics, step_series
from mecefo.sync import GradientSync

BYTES = SimpleNamespace(vocab=256, tokenizer=None)  # what check_model reads of a byte-level corpus


def config(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig(run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **overrides)


# ------------------------------------------------------------------------------------------ sources


def test_a_model_is_a_preset_or_a_local_directory(tmp_path):
    assert resolve_model_source(config(tmp_path)).kind == PRESET
    with_weights = write_model_dir(tmp_path / "llama")
    source = resolve_model_source(config(tmp_path, model=str(with_weights)))
    assert (source.kind, source.init, source.architecture) == (DIRECTORY, "pretrained", "LlamaForCausalLM")
    assert source.vocab_size == 256 and source.max_positions == 128 and source.shape.hidden_size == 64
    assert resolve_model_source(config(tmp_path, model=str(with_weights), init="random")).init == "random"
    bare = write_model_dir(tmp_path / "bare", weights=False)
    assert resolve_model_source(config(tmp_path, model=str(bare))).init == "random"


@pytest.mark.parametrize("make,overrides,message", [
    (None, dict(model="meta-llama/Llama-3.2-1B"), "--model 'meta-llama/Llama-3.2-1B' is not a local directory, "
                                                  "and nothing is downloaded at run time"),
    (None, dict(model="llama-3b"), "--model 'llama-3b' is neither a preset (tiny, small"),
    ("file", dict(), "not a directory"),
    ("empty", dict(), "no config.json: not a Hugging Face model directory"),
    ("alien", dict(), "cannot read its config.json"),
    ("bare", dict(init="pretrained"), "--init pretrained: {dir} holds no *.safetensors weights"),
    (None, dict(model="tiny", init="pretrained"), "--init pretrained: preset 'tiny' has no weights"),
    (None, dict(model_factory="no_such_module:build"), "cannot import no_such_module"),
    (None, dict(model_factory="json"), "expected MODULE:FUNCTION"),
    (None, dict(model_factory="json:no_such_function"), "json has no callable 'no_such_function'"),
])
def test_a_bad_model_is_named(tmp_path, make, overrides, message):
    directory = tmp_path / "model"
    if make == "file":
        directory.write_text("not a model")
    elif make == "empty":
        directory.mkdir()
    elif make == "alien":
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    elif make == "bare":
        write_model_dir(directory, weights=False)
    if make:
        overrides = dict(model=str(directory), **overrides)
    with pytest.raises(ConfigError, match=None) as error:
        resolve_model_source(config(tmp_path, **overrides))
    assert message.format(dir=directory) in str(error.value)


def test_an_architecture_neighbour_mode_cannot_run_is_refused_for_approximating_policies_only(tmp_path):
    gemma = write_model_dir(tmp_path / "gemma", "gemma", weights=False)  # GELU FFN, (1 + w) norms
    with pytest.raises(ConfigError, match="GemmaForCausalLM cannot run MeCeFO's neighbour mode: .*not SiLU.*use an "
                                          "exact policy") as error:
        check_model(config(tmp_path, model=str(gemma), policy="mecefo"), BYTES)
    assert error.value.field == "policy"
    for policy in ("spread", "ndb-exact", "shrink"):
        check_model(config(tmp_path, model=str(gemma), policy=policy), BYTES)


def test_the_model_must_hold_the_corpus_vocabulary_and_sequence(tmp_path):
    small_vocab = write_model_dir(tmp_path / "v100", weights=False, vocab_size=100)
    with pytest.raises(ConfigError, match=r"the corpus's token ids \(up to 255\) exceeds the model's vocabulary "
                                          r"\(100"):
        check_model(config(tmp_path, model=str(small_vocab)), BYTES)
    tokenised = SimpleNamespace(vocab=300, tokenizer="/tok")
    with pytest.raises(ConfigError, match=r"the tokenizer's vocabulary \(300 tokens\) exceeds") as error:
        check_model(config(tmp_path, model=str(write_model_dir(tmp_path / "llama", weights=False))), tokenised)
    assert error.value.field == "tokenizer"
    # a preset is a shape: with a tokenised corpus it takes the tokenizer's vocabulary
    assert resolve_model_source(config(tmp_path), corpus_vocab=300, tokenised=True).vocab_size == 300
    with pytest.raises(ConfigError, match="seq_len 200 exceeds the model's max_position_embeddings 128"):
        check_model(config(tmp_path, model=str(tmp_path / "llama"), seq_len=200), BYTES)


def test_identity_is_the_architecture_the_config_and_the_initial_weights(tmp_path):
    a = write_model_dir(tmp_path / "a", seed=1)
    b = write_model_dir(tmp_path / "b", seed=1)  # the same model written twice: same identity
    c = write_model_dir(tmp_path / "c", seed=2)  # other weights
    d = write_model_dir(tmp_path / "d", seed=1, num_hidden_layers=3)

    def identity(path, **overrides):
        cfg = config(tmp_path, model=str(path), **overrides)
        return model_identity(cfg, resolve_model_source(cfg), tmp_path / "cache")

    assert identity(a) == identity(b)
    assert identity(a)["weights"] != identity(c)["weights"] and identity(a)["config"] == identity(c)["config"]
    assert identity(a)["config"] != identity(d)["config"]
    assert identity(a, init="random") == {**identity(a), "weights": "random, seed 0"}
    assert identity(a, init="random", seed=3)["weights"] == "random, seed 3"


# ----------------------------------------------------------------------- every family, every policy


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


EXACT_ONLY = {"gpt2": dict(bos_token_id=0, eos_token_id=0), "gemma": {}}  # not LLaMA-family decoder layers


@pytest.mark.parametrize("family", [*FAMILIES, *EXACT_ONLY])
def test_every_family_runs_every_policy_with_the_right_gradients(tmp_path, corpus_cache, family):
    """3 replicas, replica 1 dead, in float64. Exact policies: the plan's normalised gradient sum is the
    full-batch gradient of the shards it processes (any causal LM: GPT-2 and Gemma too). Approximating
    ones (LLaMA family only; the others are refused): a neighbour-mode micro-batch computes the same loss
    as the normal model (only the backward is approximated), leaves exactly the attention and input-norm
    parameters without a gradient, and changes the FFN weights' gradients."""
    directory = write_model_dir(tmp_path / family, family, **EXACT_ONLY.get(family, {}))
    corpus = prepare_corpus(["stdlib"], cache_dir=corpus_cache)
    batches = Batches(corpus, seq_len=16, micro_batch=2, seed=0, vocab_size=256)
    policies = ["ndb-exact", "spread", "shrink"]
    if family in EXACT_ONLY:
        with pytest.raises(ConfigError, match="cannot run MeCeFO's neighbour mode|has no decoder layers"):
            check_model(config(tmp_path, model=str(directory), policy="mecefo"), BYTES)
    else:
        policies += ["mecefo", "spread-orphan", "neighbour-orphan"]
    for policy in policies:
        cfg = config(tmp_path, model=str(directory), dtype="float64", seq_len=16, micro_batch=2, policy=policy)
        path = neighbor_path(cfg.resolved_policy, rank=None, tau=None, basis="weight")
        model = path.prepare(build_model(cfg))
        plan = plan_step(3, [0, 2], policy, sequences=2)
        sync = GradientSync(model, path.skipped_parameters(model))
        total = None
        for replica in plan.live:
            model.zero_grad(set_to_none=True)
            run_work(model, path, batches, 0, plan.items_of(replica), "cpu")
            grads = _grads(model)
            total = grads if total is None else {n: total.get(n, 0) + grads.get(n, 0) for n in {*total, *grads}}
        for name, p in model.named_parameters():
            p.grad = total.get(name)
        if not cfg.resolved_policy.may_approximate:
            sync.normalise(plan.normalisers())
            reference = build_model(cfg)
            processed = [s for s in range(3) if s not in plan.dropped]
            xs, ys = zip(*(batches.batch(0, s) for s in processed))
            shard_loss(reference, torch.cat(xs), torch.cat(ys)).backward()
            # float64, but transformers' RMSNorms compute in float32: a different batch arrangement rounds
            # some elements differently there (seen: 1e-8 absolute, 1e-4 relative in near-cancelling sums); a
            # lost or doubled shard is off by a third of the gradient
            for name, p in reference.named_parameters():
                torch.testing.assert_close(total[name], p.grad, rtol=1e-3, atol=1e-7,
                                           msg=lambda m: f"{family} {policy} {name}: {m}")
            continue
        x, y = batches.batch(0, 1)
        with torch.no_grad():
            normal = shard_loss(model, x, y)
            with path.context(model, True):
                neighbour = shard_loss(model, x, y)
        # (the fused neighbour FFN normalises in float64, transformers' RMSNorm in float32)
        torch.testing.assert_close(neighbour, normal, rtol=1e-6, atol=0, msg=f"{family} {policy}: forward")
        model.zero_grad(set_to_none=True)
        with path.context(model, True):
            shard_loss(model, x, y).backward()
        without = {n for n, p in model.named_parameters() if p.grad is None}
        assert without == set(path.skipped_parameters(model)) and without, f"{family} {policy}"
        assert all(".self_attn." in n or ".input_layernorm." in n for n in without)
        approximated = _grads(model)
        model.zero_grad(set_to_none=True)
        shard_loss(model, x, y).backward()
        exact = _grads(model)
        gate = next(n for n in exact if n.endswith("mlp.gate_proj.weight"))
        assert not torch.allclose(approximated[gate], exact[gate]), f"{family} {policy}: low-rank FFN gradient"


# ------------------------------------------------------------------------- real runs (processes)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_through_a_kill_and_exports(tmp_path, corpus_cache, family):
    """A model directory of each family, continued from its weights under the paper's policy: replica 1 is
    SIGKILLed at step 3, its neighbour covers it in neighbour mode, it is restarted and heals; every step is
    committed once with identical state everywhere; the final model loads with from_pretrained. (Qwen2 with
    tied input and output embeddings, as Qwen2's small checkpoints have.)"""
    from transformers import AutoModelForCausalLM

    directory = write_model_dir(tmp_path / family, family, tie_word_embeddings=family == "qwen2")
    # 300 steps of this tiny model (~20 ms each) outlast the restarted replica's start-up (~5-8 s here)
    cfg = make_config(tmp_path / "run", corpus_cache, model=str(directory), replicas=3, steps=300,
                      inject=["kill@3:1"], policy="mecefo")
    result = run(cfg)
    series = check_replicas_agree(cfg.run_path, cfg.steps)
    assert any(r["neighbours"] == {"1": 2} and r["neighbour_mode"] and r["replica"] == 2
               for r in read_metrics(cfg.run_path) if "event" not in r)
    assert result.summary["heals"] >= 1 and series[-1]["live"] == [0, 1, 2]
    exported = AutoModelForCausalLM.from_pretrained(cfg.run_path / "final", local_files_only=True)
    assert type(exported).__name__ == json.loads((directory / "config.json").read_text())["architectures"][0]
    final = read_checkpoint(list_checkpoints(cfg.run_path / "checkpoints")[0][1])["model"]
    assert all(torch.equal(final[k], v) for k, v in exported.state_dict().items())


@pytest.mark.slow
def test_continued_training_starts_from_the_weights_and_the_export_is_bit_identical(tmp_path, corpus_cache):
    """float32, --init pretrained: the first step's loss is the loaded model's loss on that batch (bit for
    bit); the exported RUN_DIR/final gives the trainer's final logits bit for bit through from_pretrained."""
    from transformers import AutoModelForCausalLM

    directory = write_model_dir(tmp_path / "llama")
    cfg = make_config(tmp_path / "run", corpus_cache, model=str(directory), dtype="float32", replicas=2, steps=3)
    run(cfg)
    first = step_series(read_metrics(cfg.run_path))[0]
    loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    corpus = prepare_corpus(["stdlib"], cache_dir=corpus_cache)
    batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed, vocab_size=256)
    with torch.no_grad():
        losses = [shard_loss(loaded, *batches.batch(0, s)).item() for s in range(2)]
    assert first["loss"] == (losses[0] + losses[1]) / 2
    scratch = make_config(tmp_path / "scratch", corpus_cache, model=str(directory), init="random", dtype="float32",
                          replicas=2, steps=1)
    run(scratch)
    assert step_series(read_metrics(scratch.run_path))[0]["loss"] != first["loss"]

    trained = build_model(cfg)
    trained.load_state_dict(read_checkpoint(list_checkpoints(cfg.run_path / "checkpoints")[0][1])["model"])
    exported = AutoModelForCausalLM.from_pretrained(cfg.run_path / "final", local_files_only=True)
    x = batches.val_batch(0)[0]
    with torch.no_grad():
        assert torch.equal(trained(input_ids=x).logits, exported(input_ids=x).logits)
    marker = json.loads((cfg.run_path / "final" / "mecefo_export.json").read_text())
    assert marker["step"] == 3 and marker["init"] == "pretrained"


@pytest.mark.slow
def test_grad_accum_equals_the_bigger_micro_batch_step_for_step(tmp_path, corpus_cache):
    """float64: --grad-accum 2 --micro-batch 2 is --micro-batch 4 (the same sequences per shard, run in two
    micro-batches), through a SIGKILL whose shard is spread over the survivors in micro-batches too."""
    common = dict(replicas=3, steps=8, policy="spread", inject=["kill@3:1"], restart_after=2)
    whole = make_config(tmp_path / "whole", corpus_cache, micro_batch=4, **common)
    split = make_config(tmp_path / "split", corpus_cache, micro_batch=2, grad_accum=2, **common)
    run(whole)
    run(split)
    a, b = (check_replicas_agree(c.run_path, 8) for c in (whole, split))
    assert any(r["dropped_sequences"] == 0 and r["live"] == [0, 2] for r in b), "the kill was covered"
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-12, abs=0), ra["step"]
        assert rb["tokens"] == ra["tokens"]
    final = [read_checkpoint(list_checkpoints(c.run_path / "checkpoints")[0][1])["model"] for c in (whole, split)]
    assert relative_difference(final[1], final[0]) < 1e-12
    # the spread orphan ran as micro-batches of at most 2 sequences
    works = [w for r in read_metrics(split.run_path) if "event" not in r for w in r["work"]]
    assert all(stop - start <= 4 for _, start, stop, _ in works)


@pytest.mark.slow
def test_bfloat16_is_mixed_precision(tmp_path, corpus_cache):
    """--dtype bfloat16: float32 master weights and AdamW state, bf16 compute; an update far below bf16's
    resolution is applied, not rounded away (pure bf16 training would lose it)."""
    cfg = make_config(tmp_path / "run", corpus_cache, dtype="bfloat16", replicas=2, steps=2, lr=1e-6, warmup=0,
                      min_lr_ratio=1.0, clip=0.0)
    run(cfg)
    state = read_checkpoint(list_checkpoints(cfg.run_path / "checkpoints")[0][1])
    start = build_model(cfg).state_dict()
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    w = "model.layers.0.mlp.gate_proj.weight"
    moved = (state["model"][w] - start[w]).abs()
    half_ulp = start[w].abs() * 2 ** -9  # bf16 keeps 8 significant bits: pure bf16 rounds smaller steps away
    assert ((moved > 0) & (moved < half_ulp)).float().mean() > 0.5, "updates below bf16's resolution are kept"
    fp32 = make_config(tmp_path / "fp32", corpus_cache, dtype="float32", replicas=2, steps=2, lr=1e-6, warmup=0,
                       min_lr_ratio=1.0, clip=0.0)
    run(fp32)
    losses = [step_series(read_metrics(c.run_path))[0]["loss"] for c in (cfg, fp32)]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=2e-2)


FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn


    class Recurrent(nn.Module):
        """Not a transformer: an embedding, a GRU and a head; forward(input_ids) -> logits."""

        def __init__(self, vocab=256, width=32):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.rnn = nn.GRU(width, width, batch_first=True)
            self.head = nn.Linear(width, vocab)

        def forward(self, input_ids):
            return self.head(self.rnn(self.embed(input_ids))[0])


    def recurrent():
        return Recurrent()


    def llama():
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
''')


@pytest.mark.slow
def test_a_model_factory_trains_exact_policies_and_neighbour_mode_needs_decoder_layers(tmp_path, corpus_cache,
                                                                                       monkeypatch):
    from mecefo.launch import prepare_run_dir

    (tmp_path / "my_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)  # the replicas import the factory from the directory they start in
    monkeypatch.syspath_prepend(str(tmp_path))
    exact = make_config(tmp_path / "rnn", corpus_cache, model=None, model_factory="my_models:recurrent", policy="spread",
                        replicas=2, steps=4, inject=["kill@2:1"], restart_after=1)
    run(exact)
    check_replicas_agree(exact.run_path, 4)
    assert (exact.run_path / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="my_models:recurrent has no decoder layers .* use an exact policy"):
        prepare_run_dir(make_config(tmp_path / "refused", corpus_cache, model=None, model_factory="my_models:recurrent",
                                    policy="mecefo"))
    approximating = make_config(tmp_path / "llama", corpus_cache, model=None, model_factory="my_models:llama",
                                policy="mecefo",
                                replicas=2, steps=4, inject=["kill@2:1"], restart_after=1)
    run(approximating)
    check_replicas_agree(approximating.run_path, 4)
    assert any(r["neighbour_mode"] for r in read_metrics(approximating.run_path) if "event" not in r)


@pytest.mark.slow
def test_your_model_your_tokenizer_your_data(tmp_path, corpus_cache, bpe_tokenizer):
    """The README's recipe end to end: a Hugging Face directory whose vocabulary is the tokenizer's, JSON Lines
    tokenised by that tokenizer, a SIGKILL under spread; RUN_DIR/final loads with from_pretrained and its
    tokenizer with AutoTokenizer, and reproduces the final checkpoint's logits. A model whose vocabulary is
    smaller than the tokenizer's is refused before anything starts; a preset takes the tokenizer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import BPE_VOCAB
    from mecefo.data import stdlib_sources
    from mecefo.launch import prepare_run_dir

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": p.read_text(), "path": p.name}) + "\n"
                            for p in stdlib_sources()[20:80]))
    directory = write_model_dir(tmp_path / "llama", vocab_size=BPE_VOCAB)
    common = dict(tokenizer=str(bpe_tokenizer), data=[str(data)], dtype="float32", replicas=3, steps=120,
                  inject=["kill@3:1"], policy="spread", micro_batch=1, grad_accum=2)
    cfg = make_config(tmp_path / "run", corpus_cache, model=str(directory), **common)
    result = run(cfg)
    check_replicas_agree(cfg.run_path, cfg.steps)
    assert result.summary["heals"] >= 1
    final = cfg.run_path / "final"
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert len(tokenizer) == BPE_VOCAB and tokenizer.eos_token == "</s>"
    exported = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    trained = build_model(cfg)
    trained.load_state_dict(read_checkpoint(list_checkpoints(cfg.run_path / "checkpoints")[0][1])["model"])
    x = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(trained(input_ids=x).logits, exported(input_ids=x).logits)

    small = write_model_dir(tmp_path / "small-vocab", weights=False)  # 256 < 400
    with pytest.raises(ConfigError, match=r"the tokenizer's vocabulary \(400 tokens\) exceeds the model's "
                                          r"vocabulary \(256"):
        prepare_run_dir(make_config(tmp_path / "refused", corpus_cache, model=str(small), **common))
    preset = make_config(tmp_path / "preset", corpus_cache, model="tiny", **{**common, "steps": 2, "inject": []})
    run(preset)
    assert AutoModelForCausalLM.from_pretrained(preset.run_path / "final").config.vocab_size == BPE_VOCAB
