"""ESM-2: numerical equivalence with HF EsmForMaskedLM, conversion, loss, recompute, size."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bionemo.config import ModelConfig
from bionemo.models import build_model
from bionemo.models.esm2 import ESM2
from bionemo.models.esm2 import convert
from bionemo.models.esm2.model import IGNORE_INDEX, MASK_ID, PAD_ID

import transformers  # noqa: E402  (test extra: a missing install fails, never skips)

from tests.test_resume import (  # noqa: E402,F401 -- data_dir is a fixture
    assert_bitwise_equal,
    data_dir,
    launch,
    make_run,
    train_losses,
    wait_all,
)

SMALL = dict(
    name="esm2_tiny",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    seq_length=64,
)


def small_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**(SMALL | overrides))


def make_batch(seed: int = 0, lengths=(64, 40, 17, 5)):
    """Right-padded batch of <cls> seq <eos> with some <mask> tokens, and MLM labels."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    ids = torch.full((B, S), PAD_ID)
    mask = torch.zeros(B, S, dtype=torch.bool)
    labels = torch.full((B, S), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 24, (n,), generator=g)  # the 20 standard amino acids
        ids[b, 0], ids[b, n - 1] = 0, 2  # <cls>, <eos>
        mask[b, :n] = True
        picked = torch.rand(n, generator=g) < 0.3  # generous, so short rows get some too
        picked[0] = picked[n - 1] = False
        picked[1] = True
        labels[b, :n][picked] = ids[b, :n][picked]
        ids[b, :n][picked & (torch.rand(n, generator=g) < 0.8)] = MASK_ID
    return ids, mask, labels


def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """A seeded HF EsmForMaskedLM with every parameter random (biases and LayerNorms included,
    so a mix-up in conversion cannot hide behind zeros and ones)."""
    torch.manual_seed(seed)
    hf_cfg = convert.to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"  # the plain reference, independent of our SDPA path
    hf = transformers.EsmForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                # 10x the init std: peaked attention, so positions (RoPE) and masking matter a lot
                # more to the logits than float rounding does.
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    assert hf.lm_head.decoder.weight is hf.esm.embeddings.word_embeddings.weight
    return hf


def test_matches_hf_logits_on_padded_masked_batch():
    cfg = small_cfg()
    hf = random_hf_model(cfg)
    ours = convert.from_hf(hf).eval()
    ids, mask, _ = make_batch()
    assert (ids == MASK_ID).any() and not mask.all()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits
        got = ours.logits(ours(ids, mask))
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert (got[mask] - ref[mask]).abs().max() <= 1e-5 * ref[mask].abs().max()


def test_token_dropout_off_matches_hf():
    cfg = small_cfg(token_dropout=False)
    hf = random_hf_model(cfg, seed=1)
    ours = convert.from_hf(hf).eval()
    ids, mask, _ = make_batch(seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits
        got = ours.logits(ours(ids, mask))
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_conversion_round_trips_exactly():
    cfg = small_cfg()
    torch.manual_seed(0)
    ours = ESM2(cfg)
    sd = ours.state_dict()
    back = convert.hf_to_ours(convert.ours_to_hf(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # Ours -> HF model -> ours: the HF model computes the same logits, and its weights come back.
    hf = convert.to_hf(ours)
    ids, mask, _ = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, attention_mask=mask.long()).logits[mask],
            ours.eval().logits(ours(ids, mask))[mask],
            rtol=1e-5,
            atol=1e-5,
        )
    again = convert.from_hf(hf).state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)

    # HF -> ours -> HF keeps every HF tensor but the ones we drop on purpose.
    hf_sd = hf.state_dict()
    hf_back = convert.ours_to_hf(convert.hf_to_ours(hf_sd))
    dropped = set(hf_sd) - set(hf_back)
    assert dropped and all("inv_freq" in k or "contact_head" in k for k in dropped)
    assert all(torch.equal(hf_back[k], hf_sd[k]) for k in hf_back)


def test_hf_to_ours_rejects_untied_decoder_and_unknown_keys():
    sd = convert.ours_to_hf(ESM2(small_cfg()).state_dict())
    untied = sd | {"lm_head.decoder.weight": sd["lm_head.decoder.weight"] + 1}
    with pytest.raises(ValueError, match="ties"):
        convert.hf_to_ours(untied)
    with pytest.raises(ValueError, match="position_embeddings"):
        absolute = {"esm.embeddings.position_embeddings.weight": torch.zeros(1)}  # ESM-1b style
        convert.hf_to_ours(sd | absolute)


def test_loss_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    model = ESM2(small_cfg())
    ids, mask, labels = make_batch()
    loss = model.loss(ids, mask, labels)
    full = model.logits(model(ids, mask))
    ref = F.cross_entropy(full.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    # No labeled position: zero, not NaN, and backward still works.
    empty = model.loss(ids, mask, torch.full_like(labels, IGNORE_INDEX))
    assert empty.item() == 0.0
    empty.backward()


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_same_loss_and_grads(mode):
    ids, mask, labels = make_batch()
    results = []
    for ac in ("none", mode):
        torch.manual_seed(0)
        model = ESM2(small_cfg(activation_checkpointing=ac)).train()
        loss = model.loss(ids, mask, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_init_is_deterministic_and_hf_like():
    torch.manual_seed(3)
    a = ESM2(small_cfg())
    torch.manual_seed(3)
    b = ESM2(small_cfg())
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert torch.all(a.embed_tokens.weight[PAD_ID] == 0)
    assert torch.all(a.layers[0].attn.qkv_proj.bias == 0) and torch.all(a.lm_head.bias == 0)
    assert torch.all(a.final_norm.weight == 1)
    std = a.layers[0].mlp.fc1.weight.std().item()
    assert 0.018 < std < 0.022  # N(0, 0.02)


def test_parameter_count_matches_config_formula_and_hf():
    cfg = ModelConfig(
        name="esm2_8m", num_layers=6, hidden_size=320, num_attention_heads=20, ffn_hidden_size=1280
    )
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_parameters
    # HF's EsmForMaskedLM adds only the contact head (one logistic regression over all
    # layers x heads attention maps, plus its bias), and counts the tied decoder once.
    hf = transformers.EsmForMaskedLM(convert.to_hf_config(cfg))
    contact = cfg.num_layers * cfg.num_attention_heads + 1
    assert sum(p.numel() for p in hf.parameters()) == n + contact


def test_build_model_rejects_unknown_family():
    cfg = ModelConfig.model_construct(**(SMALL | {"family": "bert"}))
    with pytest.raises(ValueError, match="model.family"):
        build_model(cfg)
    assert isinstance(build_model(small_cfg()), ESM2)


# ---- dropout (model.hidden_dropout, model.attention_dropout): applied, training mode only


def _twins(**dropout):
    """A dropout-free model and a model with `dropout`, holding the same weights."""
    torch.manual_seed(0)
    plain = ESM2(small_cfg())
    other = ESM2(small_cfg(**dropout))
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("dropout", [dict(hidden_dropout=0.1), dict(attention_dropout=0.1)])
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_changes_training_and_leaves_eval_exact(dropout, packed):
    plain, other = _twins(**dropout)
    ids, mask, labels = make_batch()
    kw = {}
    if packed:  # the packed row of the four sequences (one SDPA per sequence on CPU)
        n = mask.sum(-1)
        ids, labels = ids[mask][None], labels[mask][None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        kw = dict(cu_seqlens=F.pad(n.cumsum(0), (1, 0)), max_seqlen=int(n.max()))
    torch.manual_seed(1)
    base = plain.train().loss(ids, mask, labels, **kw)
    torch.manual_seed(1)
    drawn = other.train().loss(ids, mask, labels, **kw)
    assert not torch.equal(drawn, base)  # before the fix: bitwise equal
    torch.manual_seed(1)
    assert torch.equal(other.loss(ids, mask, labels, **kw), drawn)  # masks from torch's RNG
    with torch.no_grad():
        evals = [m.eval().loss(ids, mask, labels, **kw) for m in (plain, other, other)]
    assert torch.equal(evals[0], evals[1]) and torch.equal(evals[1], evals[2])


def test_hidden_dropout_sits_where_hf_puts_it(monkeypatch):
    """With dropout replaced by a fixed scaling, our training-mode logits equal HF's EsmForMaskedLM
    with the same hidden_dropout_prob: same places (attention output, MLP output), no others."""
    cfg = small_cfg(hidden_dropout=0.1)
    hf = random_hf_model(cfg)
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    ours = ESM2(cfg)
    ours.load_state_dict(convert.hf_to_ours(hf.state_dict()))
    monkeypatch.setattr(
        F,
        "dropout",
        lambda x, p=0.5, training=True, inplace=False: x * 0.5 if training and p > 0 else x,
    )
    ids, mask, _ = make_batch()
    with torch.no_grad():
        ref = hf.train()(input_ids=ids, attention_mask=mask.long()).logits
        got = ours.train().logits(ours(ids, mask))
        plain = ours.eval().logits(ours(ids, mask))
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[mask], plain[mask], atol=1e-3)  # the scaling did apply


def test_resume_with_dropout_is_bitwise_exact(tmp_path, data_dir):
    """2 gloo ranks with dropout 0.1: stop one rank by signal mid-run, restart; the per-rank RNG
    states in the checkpoint give the same dropout masks, so losses and weights are identical."""
    import random
    import signal
    import time

    import yaml

    from bionemo import rundir
    from bionemo.config import REQUEUE_EXIT_CODE

    steps = 20

    def run(name: str) -> Path:
        path = make_run(tmp_path / name, data_dir, max_steps=steps)
        cfg = yaml.safe_load((path / rundir.CONFIG).read_text())
        cfg["trainer"]["model"].update(hidden_dropout=0.1, attention_dropout=0.1)
        cfg["trainer"]["checkpoint"]["every_steps"] = 5
        (path / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
        return path

    ref = run("uninterrupted")
    assert wait_all(launch(ref, world=2)) == [0, 0]
    stopped = run("stopped")
    stop_at = random.Random(time.time_ns()).randint(3, steps - 6)
    procs = launch(stopped, world=2, BIONEMO_STEP_SLEEP="0.2")
    deadline = time.time() + 240
    while time.time() < deadline:
        if (stopped / rundir.METRICS).exists() and max(train_losses(stopped), default=0) >= stop_at:
            break
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGUSR2)
    assert wait_all(procs) == [REQUEUE_EXIT_CODE] * 2
    assert stop_at <= rundir.latest_complete_step(stopped) < steps
    assert wait_all(launch(stopped, world=2)) == [0, 0]
    assert train_losses(stopped) == train_losses(ref)
    final = [tmp_path / f"{p.name}.pt" for p in (ref, stopped)]
    for path, out in zip((ref, stopped), final):
        dcp_to_torch_save(rundir.step_dir(path, steps), out)
    assert_bitwise_equal(*(torch.load(f, weights_only=False) for f in final))


def test_a_run_with_dropout_differs_from_one_without(tmp_path, data_dir):
    """The trainer honours the keys: two 2-step runs, dropout 0 and 0.1 (before: identical)."""
    import yaml

    from bionemo import rundir

    paths = []
    for p in (0.0, 0.1):
        path = make_run(tmp_path / f"dropout-{p}", data_dir, max_steps=2)
        cfg = yaml.safe_load((path / rundir.CONFIG).read_text())
        cfg["trainer"]["model"].update(hidden_dropout=p, attention_dropout=p)
        (path / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
        paths.append(path)
    procs = [proc for path in paths for proc in launch(path, world=1)]
    assert wait_all(procs) == [0, 0]
    plain, dropped = (train_losses(path) for path in paths)
    assert plain.keys() == dropped.keys() == {1, 2}
    assert plain[1] != dropped[1]


def test_the_other_familys_switches_are_refused_not_ignored():
    """Config audit (issue 13): model.activation is Geneformer's (ESM-2 is GELU only) and
    model.token_dropout ESM-2's; set on the other family they were accepted and ignored."""
    with pytest.raises(ValueError, match="activation 'relu'"):
        small_cfg(activation="relu")
    with pytest.raises(ValueError, match="token_dropout"):
        ModelConfig(**(SMALL | dict(family="geneformer", token_dropout=True)))
    assert small_cfg(activation="gelu").activation == "gelu"
