"""Reproduce the paper's Table 1 and ablations (Figs. 2, 4) on real human preference data.

This script only *drives* the four stages: it calls embed.py's loaders once per (dataset,
embedder), makes the seeded train/test splits itself from that cached embedding, and then runs
vae.main -> synthesize.main -> reward.main over grids, one output folder per run. A "seed" here
is everything at once, as in the paper's error bars: split seed = VAE seed = synthesis seed =
RM seed. Every number is held-out pairwise accuracy of the reward model (our Deviation from the
paper's Best-of-16 gold score, which needs a policy and a gold RM; see rs_sft.py for that metric).

    python reproduce.py                   # full grid: ~18.5 min of runs + the embeddings, computed once
    python reproduce.py --quick           # reduced grid on HH helpful: 36 s once its embedding is cached
    python reproduce.py --sections seed_size,investigate --seeds 10   # a subset, more seeds

Measured on 2 shared CPU cores: the full grid took ~18.5 min from cached embeddings; the
embeddings took 13.5 / 12 / 9 min for HH helpful / HH harmless / TL;DR with MiniLM and 17 min for
the 600-pair SmolLM2 subset, under heavy contention (about 2.5 min per MiniLM set on quiet cores).
Expected result (Table 1: 10 seeds, MiniLM, 1,000 seed pairs): LENS does not beat original-only;
paired differences at 4x are -0.95 (HH helpful, p=0.014), -1.58 (HH harmless, p=0.012), +0.67
(TL;DR, 587 seed pairs, p=0.39) accuracy points. The README's "Results vs paper" section has
every number and the investigation of why.

Sections (each writes results/<section>.json; figures are redrawn from whatever JSON exists):
    table1       original / direct / gaussian / LENS at 2x 4x 8x on HH helpful, HH harmless, TL;DR
    sigma2       LENS 4x over sigma^2                        (paper Fig. 2b)
    gamma        LENS 4x over gamma (VAE retrained)           (Fig. 2a)
    beta         LENS 4x over beta (VAE retrained)            (Fig. 4a)
    seed_size    original vs LENS 4x over the number of seed pairs; the original arm is also the
                 learning curve "is the RM data-limited?"    (Fig. 2c)
    composition  original vs synthetic-only vs combined       (Fig. 4b)
    embedders    MiniLM (encoder, mean pool) vs SmolLM2-135M (decoder, last token), reduced set
    investigate  VAE R^2 (vs a PCA ceiling), agreement of synthetic pairs with a reference RM
                 trained on the held-out pool, and settings that might help (small seed sets,
                 bigger VAE, low beta, down-weighted synthetic pairs)
Outputs: results/*.json, results/*.png, results/results_vs_paper.md, results/run_info.json.
Caches (git-ignored): results/cache/emb (embeddings), results/cache/splits, results/cache/runs
(one folder per stage run; a finished run is read back instead of recomputed: --fresh to redo).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

import embed
import reward
import synthesize
import vae
from embed import UserError

DATASETS = {"hh-helpful": "hh-rlhf/helpful-base/test.jsonl.gz",
            "hh-harmless": "hh-rlhf/harmless-base/test.jsonl.gz",
            "tldr": "tldr-comparisons/batch13.json"}
SECTIONS = ["table1", "sigma2", "gamma", "beta", "seed_size", "composition", "embedders", "investigate"]
# Paper Table 1 [notes]: Best-of-16 gold score, 1,000 seed pairs, Llama-3.1-8B embeddings.
PAPER = {"hh": {"original": 1.43, "direct": {4: 1.32, 8: 1.46}, "gaussian": {4: 1.12, 8: 0.94}, "lens": {4: 1.94, 8: 2.20}},
         "tldr": {"original": 0.78, "direct": {4: 0.84, 8: 0.79}, "gaussian": {4: 0.53, 8: 0.43}, "lens": {4: 1.44, 8: 1.48}}}


@dataclass
class Args:
    data_dir: str = "../shared/data"
    datasets: str = "hh-helpful,hh-harmless,tldr"  # names in DATASETS, or paths to preference files
    sections: str = "all"  # comma list of SECTIONS, or "all"
    seeds: int = 5  # seeds per cell (split + VAE + synthesis + RM together) in every section but table1
    table1_seeds: int = 10  # Table 1 is the headline: 10 seeds make its paired test sharper (CI about +-0.7 points)
    n_seed: int = 1000  # seed pairs (paper: 1,000) where the data allows ...
    min_test: int = 500  # ... i.e. at least this many held-out pairs remain (TL;DR: 1,097 pairs -> 587 seed)
    methods: str = "direct,gaussian,lens"
    factors: str = "2,4,8"
    sigma2: float = 0.01  # defaults of every run unless a grid varies them (paper values)
    factor: int = 4
    sigma2s: str = "0.001,0.01,0.1,1.0"
    gammas: str = "0,0.05,0.1,0.5,1.0"
    betas: str = "0.01,0.1,1,4"  # log-spaced around the plain ELBO (1): near-autoencoder to over-regularised
    seed_sizes: str = "100,250,500,1000,2000"
    ablation_dataset: str = "hh-helpful"  # dataset of every section but table1
    embedders: str = "minilm,smollm2"
    family_max_pairs: int = 600  # embedders section: a fixed group subset (SmolLM2 is ~1 text/s here)
    family_n_seed: int = 300  # seed pairs there; the other ~300 are the test set
    family_max_length: int = 128
    max_length: int = 256  # tokens per (prompt, response) for the main embeddings
    vae_epochs: int = 200
    rm_epochs: int = 20
    min_effect: float = 0.01  # accuracy gap below which a non-significant result counts as "no effect"
    quick: bool = False  # reduced grid (2 seeds, one factor, few epochs) for tests and a first look
    fresh: bool = False  # ignore finished runs in the cache and recompute them
    cache_dir: str = "results/cache"
    out_dir: str = "results"
    embed_threads: int = 2  # the transformer forward pass uses both cores; the small models use one


QUICK = dict(seeds=2, table1_seeds=2, methods="direct,lens", factors="4", sigma2s="0.01,1.0", gammas="0,0.1", betas="0.1,1",
             embedders="minilm", vae_epochs=30, rm_epochs=5)


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        if isinstance(default, bool):
            p.add_argument("--" + name.replace("_", "-"), action="store_true")
        else:
            p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731


# ---------------------------------------------------------------------------------------------
# Statistics: every comparison is paired by seed (same split, same RM seed, same test pairs).
# ---------------------------------------------------------------------------------------------
def paired_test(a: list, b: list) -> dict:
    """a - b per seed: mean, sample std, 95% CI, paired t-test and Wilcoxon signed-rank p-values.

    t = mean(d) / (std(d) / sqrt(n)) with n - 1 degrees of freedom (scipy.stats.ttest_rel).
    With 5 seeds the smallest two-sided Wilcoxon p is 2/32 = 0.0625, so the t-test is the main one.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()), "std": float(d.std(ddof=1)) if n > 1 else 0.0,
           "n_better": int((d > 0).sum()), "n_worse": int((d < 0).sum()), "t": None, "p_ttest": None,
           "ci95": None, "p_wilcoxon": None}
    if n > 1 and out["std"] > 0:
        t, p = stats.ttest_rel(a, b)
        half = stats.t.ppf(0.975, n - 1) * out["std"] / math.sqrt(n)
        out.update(t=float(t), p_ttest=float(p), ci95=[out["mean"] - half, out["mean"] + half])
    if n > 1 and (d != 0).any():
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def summary(xs: list) -> dict:
    x = np.asarray(xs, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "runs": [float(v) for v in x]}


def verdict(test: dict, paper_delta, min_effect: float) -> str:
    """Our paired difference against the direction the paper reports for the same cell."""
    if paper_delta is None:
        return "n/a (not in paper)"
    if test["p_ttest"] is not None and test["p_ttest"] < 0.05:
        return "holds" if np.sign(test["mean"]) == np.sign(paper_delta) else "does not hold"
    ci = test["ci95"] or [test["mean"], test["mean"]]
    if max(abs(ci[0]), abs(ci[1])) < min_effect:  # a tight interval around zero: no effect
        return "does not hold (no effect)"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------
# Embeddings: computed once per (dataset, embedder) with ALL usable pairs, then split per seed.
# ---------------------------------------------------------------------------------------------
def slug(path: str) -> str:
    name = "_".join(os.path.normpath(path).replace("\\", "/").split("/")[-3:])
    for ext in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name.lstrip("._")


def embed_all(dataset: str, model: str, max_length: int, max_pairs: int, cache_dir: str, threads: int) -> dict:
    """{"chosen", "rejected": [N, d], "group", "prompt", "chosen_text", "rejected_text": [N], "meta"}, cached."""
    path = os.path.join(cache_dir, "emb", f"{slug(dataset)}__{model}__L{max_length}__{max_pairs or 'all'}.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    fmt, pairs = embed.load_pairs(dataset, "train")
    kept = [p for p in pairs if p["chosen"] != p["rejected"] and p["chosen"] and p["rejected"]]
    if max_pairs and len(kept) > max_pairs:
        # A fixed, seed-independent subset of whole groups (for the slow SmolLM2 embedder).
        groups = sorted({p["group"] for p in kept})
        random.Random(1234).shuffle(groups)
        size = {}
        for p in kept:
            size[p["group"]] = size.get(p["group"], 0) + 1
        take, n = set(), 0
        for g in groups:
            if n >= max_pairs:
                break
            take.add(g)
            n += size[g]
        kept = [p for p in kept if p["group"] in take]
    torch.set_num_threads(threads)
    tok, mdl, model_id, is_decoder = embed.load_embedder(model, "cpu")
    pooling = "last" if is_decoder else "mean"  # embed.py's "auto" rule
    t0 = time.perf_counter()
    # e± = LLM_embed(x, y±): the same "prompt + ' ' + response" text as embed.py
    texts = [p["prompt"] + " " + p[side] for side in ("chosen", "rejected") for p in kept]
    e = embed.embed_texts(texts, tok, mdl, pooling, max_length, 32, "cpu")
    n = len(kept)
    full = {"chosen": e[:n].contiguous(), "rejected": e[n:].contiguous(), "group": [p["group"] for p in kept],
            "prompt": [p["prompt"] for p in kept], "chosen_text": [p["chosen"] for p in kept],
            "rejected_text": [p["rejected"] for p in kept],
            "meta": dict(dataset=dataset, format=fmt, model=model_id, pooling=pooling, max_length=max_length,
                         d=int(e.shape[1]), n_pairs_read=len(pairs), n_dropped_identical=len(pairs) - len(kept),
                         n_pairs=n, seconds=time.perf_counter() - t0)}
    embed.atomic_save(full, path)
    print(f"reproduce: embedded {n} pairs of {dataset} with {model} in {full['meta']['seconds']:.0f}s", flush=True)
    return full


def split_indices(groups: list, n_pool: int, seed: int) -> tuple:
    """Seeded split by group (a prompt / a TL;DR post never sits on both sides).

    Whole groups fill a pool of n_pool pairs; every other group is held out. Seed sets of any
    size n <= n_pool are the first n pool pairs, so a seed-size sweep shares one test set.
    """
    by_group = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    keys = sorted(by_group)
    random.Random(seed).shuffle(keys)
    pool, test = [], []
    for k in keys:
        (pool if len(pool) < n_pool else test).extend(by_group[k])
    # Deviation: the last pool group can overshoot n_pool by a pair or two; those pairs are
    # dropped (neither seed nor test) so that every seed set has exactly the size asked for.
    return pool[:n_pool], test


def split_file(full: dict, tag: str, n_pool: int, n_seed: int, seed: int, cache_dir: str, min_test: int) -> str:
    """Write an embed.py-format file (same schema, so the stages accept it) for one seeded split."""
    path = os.path.join(cache_dir, "splits", f"{tag}__pool{n_pool}_n{n_seed}_s{seed}.pt")
    if os.path.isfile(path):
        return path
    pool, test = split_indices(full["group"], n_pool, seed)
    if len(pool) < n_pool or len(test) < min_test:
        raise UserError(f"{full['meta']['dataset']}: {len(full['group'])} pairs cannot give {n_pool} seed/pool pairs "
                        f"and >= {min_test} held-out pairs; lower --n-seed, --seed-sizes or --min-test")
    part = lambda idx: {"chosen": full["chosen"][idx].contiguous(), "rejected": full["rejected"][idx].contiguous(),  # noqa: E731
                        **{k: [full[k][i] for i in idx] for k in ("prompt", "chosen_text", "rejected_text")}}
    m = full["meta"]
    meta = dict(stage="embed", schema=embed.SCHEMA, dataset=m["dataset"], format=m["format"], model=m["model"],
                pooling=m["pooling"], max_length=m["max_length"], seed=seed, d=m["d"], n_pairs_read=m["n_pairs_read"],
                n_dropped_identical=m["n_dropped_identical"], n_train=n_seed, n_test=len(test),
                args={"made_by": "reproduce.py", "n_pool": n_pool})
    embed.atomic_save({"train": part(torch.tensor(pool[:n_seed])), "test": part(torch.tensor(test)), "meta": meta}, path)
    return path


# ---------------------------------------------------------------------------------------------
# One run = vae.main -> synthesize.main -> reward.main (seeds=1), each in its own cached folder.
# ---------------------------------------------------------------------------------------------
VAE_DEFAULT = dict(d_vae=16, hidden=64, beta=1.0, gamma=0.1)


def kv(cfg: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(cfg.items()))


def run_vae(split: str, seed: int, cfg: dict, R) -> tuple:
    folder = os.path.join(R.runs, os.path.basename(split)[:-3], "vae_" + kv({**cfg, "ep": R.args.vae_epochs}))
    path = os.path.join(folder, "vae.pt")
    if R.args.fresh and folder not in R.done:
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.isfile(os.path.join(folder, "vae.json")):
        with torch.enable_grad():  # callers may hold torch.no_grad() (e.g. section_investigate)
            vae.main(vae.Args(embeddings=split, out=path, seed=seed, epochs=R.args.vae_epochs, threads=1, **cfg))
    R.done.add(folder)
    with open(os.path.join(folder, "vae.json")) as f:
        return path, json.load(f)


def run_cell(split: str, seed: int, R, method="lens", factor=None, sigma2=None, weight=1.0, vae_cfg=None) -> dict:
    """Accuracy of original and augmented RM (same RM seed) plus the VAE's held-out R^2, for one seed."""
    vae_cfg = {**VAE_DEFAULT, **(vae_cfg or {})}
    vae_path, vae_metrics = run_vae(split, seed, vae_cfg, R)
    syn = dict(method=method, factor=factor or R.args.factor, sigma2=sigma2 or R.args.sigma2)
    folder = os.path.join(os.path.dirname(vae_path), f"syn_{kv(syn)}_w{weight}_rmep{R.args.rm_epochs}")
    if R.args.fresh and folder not in R.done:
        shutil.rmtree(folder, ignore_errors=True)
    res_path = os.path.join(folder, "reward.json")
    if not os.path.isfile(res_path):
        syn_path = os.path.join(folder, "synthetic.pt")
        synthesize.main(synthesize.Args(embeddings=split, vae=vae_path, out=syn_path, seed=seed, **syn))
        reward.main(reward.Args(embeddings=split, synthetic=syn_path, out=os.path.join(folder, "reward.pt"), seeds=1,
                                seed=seed, epochs=R.args.rm_epochs, synthetic_weight=weight, threads=1))
        os.remove(syn_path)  # up to 20 MB each; synthesis is deterministic and takes milliseconds to redo
    R.done.add(folder)
    with open(res_path) as f:
        res = json.load(f)
    with open(os.path.join(folder, "synthetic.json")) as f:
        shift = json.load(f)["mean_shift_from_source_std_space"]  # ||e_hat - e||, standardised units
    return {"original": res["original"]["test_accuracy_mean"], "augmented": res["augmented"]["test_accuracy_mean"],
            "vae_r2": vae_metrics["test"]["r2"], "vae_eps_rec": vae_metrics["test"]["eps_rec"], "shift": shift}


def cells_summary(cells: list) -> dict:
    """Mean +- std of each arm and the paired test augmented - original over seeds."""
    o, a = [c["original"] for c in cells], [c["augmented"] for c in cells]
    return {"original": summary(o), "augmented": summary(a), "diff": paired_test(a, o),
            "vae_r2": summary([c["vae_r2"] for c in cells]), "synthetic_shift": summary([c["shift"] for c in cells])}


class Runner:
    """Holds the args, the cache folders and the per-dataset embeddings of one reproduce.py call."""

    def __init__(self, args: Args):
        self.args, self.runs, self.done, self.full = args, os.path.join(args.cache_dir, "runs"), set(), {}

    def dataset_path(self, name: str) -> str:
        return os.path.join(self.args.data_dir, DATASETS[name]) if name in DATASETS else name

    def embeddings(self, name: str, model="minilm", max_length=None, max_pairs=0) -> tuple:
        key = (name, model, max_length or self.args.max_length, max_pairs)
        if key not in self.full:
            self.full[key] = embed_all(self.dataset_path(name), model, key[2], max_pairs, self.args.cache_dir, self.args.embed_threads)
        tag = f"{slug(name)}__{model}__L{key[2]}__{max_pairs or 'all'}"
        return self.full[key], tag

    def n_seed(self, full: dict) -> int:
        # 1,000 seed pairs where the data allows, else as many as leave --min-test held out
        # (less 10 pairs of slack: the split drops the overshoot of the group cut at the boundary).
        n = min(self.args.n_seed, len(full["group"]) - self.args.min_test - 10)
        if n < 10:
            raise UserError(f"{full['meta']['dataset']} has only {len(full['group'])} usable pairs; lower --min-test")
        return n

    def split(self, name: str, seed: int, n_pool=None, n_seed=None, min_test=None, **emb) -> str:
        full, tag = self.embeddings(name, **emb)
        n_pool = n_pool or self.n_seed(full)
        return split_file(full, tag, n_pool, n_seed or n_pool, seed, self.args.cache_dir, min_test or self.args.min_test)

    def seeds(self):
        return range(self.args.seeds)


# ---------------------------------------------------------------------------------------------
# The sections. Each returns a JSON-able dict; main() saves it as results/<section>.json.
# ---------------------------------------------------------------------------------------------
def section_table1(R) -> dict:
    out = {}
    for name in R.args.datasets.split(","):
        per_method = {}
        for s in range(R.args.table1_seeds):
            split = R.split(name, s)
            for m in R.args.methods.split(","):
                for f in ints(R.args.factors):
                    per_method.setdefault(m, {}).setdefault(str(f), []).append(run_cell(split, s, R, method=m, factor=f))
        meta = torch.load(split, weights_only=True)["meta"]
        orig = [c["original"] for c in next(iter(next(iter(per_method.values())).values()))]
        out.setdefault("datasets", {})[name] = {"n_seed": meta["n_train"], "n_test": meta["n_test"], "original": summary(orig),
                     "methods": {m: {f: cells_summary(c) for f, c in fs.items()} for m, fs in per_method.items()}}
    return out


def sweep(R, key: str, values: list) -> dict:
    """LENS at --factor on the ablation dataset, one grid knob varied (VAE knobs retrain the VAE)."""
    rows = {}
    for v in values:
        cells = []
        for s in R.seeds():
            split = R.split(R.args.ablation_dataset, s)
            kw = {"sigma2": v} if key == "sigma2" else {"vae_cfg": {key: v}}
            cells.append(run_cell(split, s, R, **kw))
        rows[str(v)] = cells_summary(cells)
    return {"dataset": R.args.ablation_dataset, "factor": R.args.factor, "knob": key, "rows": rows}


def section_seed_size(R) -> dict:
    # Deviation: a 2,000-pair pool leaves only ~350 of HH helpful's 2,348 pairs for testing, so
    # this section accepts half of --min-test; all sizes share that one test set per seed.
    sizes, mt = ints(R.args.seed_sizes), R.args.min_test // 2
    rows = {}
    for n in sizes:
        cells = [run_cell(R.split(R.args.ablation_dataset, s, max(sizes), n, mt), s, R) for s in R.seeds()]
        rows[str(n)] = cells_summary(cells)
    meta = torch.load(R.split(R.args.ablation_dataset, 0, max(sizes), sizes[0], mt), weights_only=True)["meta"]
    return {"dataset": R.args.ablation_dataset, "n_test": meta["n_test"], "pool": max(sizes), "rows": rows}


def train_only(split: str, seed: int, c: torch.Tensor, r: torch.Tensor, folder: str, R) -> float:
    """reward.main on an embed-format file whose train pairs are (c, r) and whose test is the split's."""
    data = torch.load(split, weights_only=True)
    data["train"] = {"chosen": c.contiguous(), "rejected": r.contiguous(), "prompt": [""] * len(c),
                     "chosen_text": [""] * len(c), "rejected_text": [""] * len(c)}
    data["meta"]["n_train"] = len(c)
    path = os.path.join(folder, "embeddings.pt")
    embed.atomic_save(data, path)
    res = reward.main(reward.Args(embeddings=path, synthetic="none", out=os.path.join(folder, "reward.pt"), seeds=1,
                                  seed=seed, epochs=R.args.rm_epochs, threads=1))
    os.remove(path)
    return res["original"]["test_accuracy_mean"]


def synth(split: str, seed: int, R, method="lens", vae_cfg=None) -> dict:
    vae_path, _ = run_vae(split, seed, {**VAE_DEFAULT, **(vae_cfg or {})}, R)
    path = os.path.join(os.path.dirname(vae_path), f"tmp_syn_{method}.pt")
    synthesize.main(synthesize.Args(embeddings=split, vae=vae_path, out=path, seed=seed, method=method,
                                    factor=R.args.factor, sigma2=R.args.sigma2))
    syn = torch.load(path, weights_only=True)
    os.remove(path)
    return syn


def section_composition(R) -> dict:
    """Train on original, on synthetic pairs only (all / both sides synthetic), and on both."""
    arms = {"original": [], "synthetic_only": [], "synthetic_only_both_sides": [], "combined": []}
    for s in R.seeds():
        split = R.split(R.args.ablation_dataset, s)
        cell = run_cell(split, s, R)
        arms["original"].append(cell["original"])
        arms["combined"].append(cell["augmented"])
        folder = os.path.join(R.runs, os.path.basename(split)[:-3], f"composition_f{R.args.factor}_rmep{R.args.rm_epochs}")
        res_path = os.path.join(folder, "composition.json")
        if R.args.fresh and folder not in R.done:
            shutil.rmtree(folder, ignore_errors=True)
        if not os.path.isfile(res_path):
            syn = synth(split, s, R)
            both = syn["chosen_is_synthetic"] & syn["rejected_is_synthetic"]
            res = {"synthetic_only": train_only(split, s, syn["chosen"], syn["rejected"], folder, R),
                   "synthetic_only_both_sides": train_only(split, s, syn["chosen"][both], syn["rejected"][both], folder, R)}
            embed.atomic_json(res, res_path)
        R.done.add(folder)
        with open(res_path) as f:
            res = json.load(f)
        for k, v in res.items():
            arms[k].append(v)
    return {"dataset": R.args.ablation_dataset, "factor": R.args.factor,
            "arms": {k: summary(v) for k, v in arms.items()},
            "vs_original": {k: paired_test(v, arms["original"]) for k, v in arms.items() if k != "original"}}


def section_embedders(R) -> dict:
    out = {"dataset": R.args.ablation_dataset, "max_pairs": R.args.family_max_pairs, "max_length": R.args.family_max_length}
    for model in R.args.embedders.split(","):
        emb = dict(model=model, max_length=R.args.family_max_length, max_pairs=R.args.family_max_pairs)
        full, _ = R.embeddings(R.args.ablation_dataset, **emb)
        n = min(R.args.family_n_seed, len(full["group"]) - R.args.min_test // 2)
        per = {}
        for s in R.seeds():
            split = split_file(*R.embeddings(R.args.ablation_dataset, **emb), n, n, s, R.args.cache_dir, R.args.min_test // 2)
            for m in R.args.methods.split(","):
                per.setdefault(m, []).append(run_cell(split, s, R, method=m))
        meta = torch.load(split, weights_only=True)["meta"]
        out[model] = {"pooling": full["meta"]["pooling"], "d": full["meta"]["d"], "n_seed": n, "n_test": meta["n_test"],
                      "embed_seconds": full["meta"]["seconds"], "methods": {m: cells_summary(c) for m, c in per.items()}}
    return out


@torch.no_grad()
def pca_r2(train: torch.Tensor, test: torch.Tensor, k: int) -> float:
    """Held-out R^2 of the best rank-k linear reconstruction: the ceiling a d_vae = k linear VAE could reach."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    a, b = (train - mean) / std, (test - mean) / std
    v = torch.linalg.svd(a - a.mean(0), full_matrices=False).Vh[:k].T
    rec = (b - a.mean(0)) @ v @ v.T + a.mean(0)
    return 1 - (rec - b).pow(2).sum().item() / (b - b.mean(0)).pow(2).sum().item()


def section_investigate(R) -> dict:
    out = {"dataset": R.args.ablation_dataset, "agreement": {}, "pca_r2": {}, "regimes": {}}
    # (1) Does a reference RM, trained on the held-out pool (never on the seed pairs), order the
    # synthetic pairs like their labels? Compared with how it orders the real seed pairs.
    agree = {}
    for s in R.seeds():
        split = R.split(R.args.ablation_dataset, s)
        data = torch.load(split, weights_only=True)
        tr, te = data["train"], data["test"]
        both = torch.cat([tr["chosen"], tr["rejected"]])
        mean, std = both.mean(0), both.std(0).clamp(min=1e-6)
        ref = reward.train_reward_model((te["chosen"] - mean) / std, (te["rejected"] - mean) / std,
                                        torch.ones(len(te["chosen"])), reward.Args(epochs=R.args.rm_epochs), seed=s)
        score = lambda x: ref((x - mean) / std)  # noqa: E731
        syns = {m: synth(split, s, R, method=m) for m in R.args.methods.split(",")}
        with torch.no_grad():
            parent_margin = score(tr["chosen"]) - score(tr["rejected"])
            agree.setdefault("real_seed_pairs", []).append((parent_margin > 0).float().mean().item())
            for m, syn in syns.items():
                margin = score(syn["chosen"]) - score(syn["rejected"])
                agree.setdefault(f"{m}_synthetic", []).append((margin > 0).float().mean().item())
                # Same order as the parent pair: near 1 means the synthetic pair is a near-copy of its parent.
                agree.setdefault(f"{m}_same_order_as_parent", []).append(
                    ((margin > 0) == (parent_margin[syn["parent"]] > 0)).float().mean().item())
        # Scale of the synthesis shift: the chosen-rejected gap of a real pair, standardised units.
        agree.setdefault("_pair_gap_std_units", []).append(((tr["chosen"] - tr["rejected"]) / std).norm(dim=-1).mean().item())
        for k in (16, 64):
            out["pca_r2"].setdefault(str(k), []).append(pca_r2(both, torch.cat([te["chosen"], te["rejected"]]), k))
    out["pair_gap_std_units"] = summary(agree.pop("_pair_gap_std_units"))
    out["agreement"] = {k: summary(v) for k, v in agree.items()}
    out["pca_r2"] = {k: summary(v) for k, v in out["pca_r2"].items()}
    # (2) Settings where synthesis might help: few seed pairs, a bigger VAE, a near-autoencoder
    # (low beta, higher R^2), synthetic pairs down-weighted in the BT loss.
    configs = {"default": {}, "big_vae(d64,h256)": {"vae_cfg": {"d_vae": 64, "hidden": 256}},
               "low_beta(0.01)": {"vae_cfg": {"beta": 0.01}}, "synthetic_weight0.3": {"weight": 0.3}}
    for n in sorted({min(ints(R.args.seed_sizes)), R.args.n_seed}):
        for cname, kw in configs.items():
            cells = []
            for s in R.seeds():
                full, _ = R.embeddings(R.args.ablation_dataset)
                nn_ = min(n, R.n_seed(full))
                cells.append(run_cell(R.split(R.args.ablation_dataset, s, n_pool=nn_), s, R, **kw))
            out["regimes"][f"n{n}/{cname}"] = cells_summary(cells)
    return out


# ---------------------------------------------------------------------------------------------
# Figures (shaped like the paper's, error bars = std over seeds) and the "Results vs paper" table.
# ---------------------------------------------------------------------------------------------
def _line(ax, xs, rows, label, key="augmented", **kw):
    ax.errorbar(xs, [100 * r[key]["mean"] for r in rows], yerr=[100 * r[key]["std"] for r in rows],
                capsize=3, marker="o", label=label, **kw)


def make_figures(res: dict, out_dir: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        made.append(name)

    if "table1" in res:  # Table 1 analogue: accuracy vs factor per dataset, and the paired gain
        t = res["table1"]["datasets"]
        fig, axes = plt.subplots(2, len(t), figsize=(4.2 * len(t), 6.5), squeeze=False)
        for j, (name, d) in enumerate(t.items()):
            for m, fs in d["methods"].items():
                xs = [1] + [int(f) for f in fs]
                rows = [{"augmented": d["original"]}] + list(fs.values())
                color = {"direct": "C0", "gaussian": "C1", "lens": "C3"}.get(m)
                _line(axes[0, j], xs, rows, m, color=color)
                axes[1, j].errorbar([int(f) for f in fs], [100 * r["diff"]["mean"] for r in fs.values()],
                                    yerr=[100 * r["diff"]["std"] for r in fs.values()], capsize=3, marker="o", label=m, color=color)
            axes[0, j].set_title(f"{name}: {d['n_seed']} seed / {d['n_test']} test pairs")
            axes[1, j].axhline(0, color="k", lw=0.8)
            for ax in axes[:, j]:
                ax.set_xscale("log", base=2)
                ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
                ax.set_xlabel("augmentation factor (1 = original only)")
            axes[0, j].set_ylabel("held-out pairwise accuracy (%)")
            axes[1, j].set_ylabel("augmented - original (points, paired)")
            axes[0, j].legend(fontsize=8)
        save(fig, "table1.png")

    panels = [(k, res[k]) for k in ("gamma", "sigma2", "seed_size") if k in res]
    if panels:  # Fig. 2: (a) gamma, (b) sigma^2, (c) number of seed samples
        fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8), squeeze=False)
        for ax, (k, d) in zip(axes[0], panels):
            xs = [float(x) for x in d["rows"]]
            rows = list(d["rows"].values())
            _line(ax, xs, rows, "original", key="original", ls="--", color="gray")
            _line(ax, xs, rows, f"LENS {d.get('factor', 4)}x", color="C3")
            if k != "gamma":
                ax.set_xscale("log")
            ax.set_xlabel({"gamma": "gamma (divergence weight)", "sigma2": "sigma^2 (latent noise)",
                           "seed_size": f"seed pairs ({d.get('n_test')} fixed test pairs)"}[k])
            ax.set_ylabel("held-out accuracy (%)")
            ax.set_title({"gamma": "(a) gamma", "sigma2": "(b) sigma^2", "seed_size": "(c) seed-set size"}[k])
            ax.legend(fontsize=8)
        save(fig, "fig2_ablations.png")

    if "beta" in res or "composition" in res:  # Fig. 4: (a) beta, (b) training data composition
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        if "beta" in res:
            d = res["beta"]
            xs, rows = [float(x) for x in d["rows"]], list(d["rows"].values())
            _line(axes[0], xs, rows, "original", key="original", ls="--", color="gray")
            _line(axes[0], xs, rows, f"LENS {d['factor']}x", color="C3")
            axes[0].set_xscale("log")
            axes[0].set(xlabel="beta (KL weight)", ylabel="held-out accuracy (%)", title="(a) beta")
            axes[0].legend(fontsize=8, loc="lower right")
        if "composition" in res:
            a = res["composition"]["arms"]
            axes[1].bar(range(len(a)), [100 * v["mean"] for v in a.values()], yerr=[100 * v["std"] for v in a.values()],
                        capsize=4, color=["gray", "C0", "C1", "C3"][: len(a)])
            axes[1].set_xticks(range(len(a)), [k.replace("_", "\n") for k in a], fontsize=8)
            lo = min(v["mean"] - v["std"] for v in a.values())
            axes[1].set_ylim(100 * lo - 3, None)
            axes[1].set(ylabel="held-out accuracy (%)", title="(b) training data")
        save(fig, "fig4_ablations.png")

    if "embedders" in res:
        d = {k: v for k, v in res["embedders"].items() if isinstance(v, dict)}
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        arms = ["original"] + list(next(iter(d.values()))["methods"])
        for i, (model, v) in enumerate(d.items()):
            first = next(iter(v["methods"].values()))
            vals = [first["original"]] + [r["augmented"] for r in v["methods"].values()]
            ax.bar(np.arange(len(arms)) + 0.4 * i, [100 * x["mean"] for x in vals], 0.4, yerr=[100 * x["std"] for x in vals],
                   capsize=3, label=f"{model} ({v['pooling']} pool, d={v['d']})")
        ax.set_xticks(np.arange(len(arms)) + 0.2, [a if a == "original" else f"{a} {res['embedders'].get('factor', 4)}x" for a in arms])
        ax.set_ylim(45, None)
        v0 = next(iter(d.values()))
        ax.set(ylabel="held-out accuracy (%)", title=f"embedders: {res['embedders']['dataset']} subset, {v0['n_seed']} seed / "
               f"{v0['n_test']} test pairs, {res['embedders']['max_length']} tokens")
        ax.legend(fontsize=8)
        save(fig, "embedders.png")

    if "investigate" in res:
        d = res["investigate"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        ag = d["agreement"]
        axes[0].bar(range(len(ag)), [100 * v["mean"] for v in ag.values()], yerr=[100 * v["std"] for v in ag.values()], capsize=3)
        axes[0].set_xticks(range(len(ag)), [k.replace("_", " ") for k in ag], fontsize=7, rotation=25, ha="right")
        axes[0].axhline(50, color="k", lw=0.8)
        axes[0].set(ylabel="% of pairs", title="reference RM (trained on held-out pool)")
        rg = d["regimes"]
        axes[1].barh(range(len(rg)), [100 * v["diff"]["mean"] for v in rg.values()],
                     xerr=[100 * v["diff"]["std"] for v in rg.values()], capsize=3, color="C3")
        axes[1].set_yticks(range(len(rg)), list(rg), fontsize=8)
        axes[1].axvline(0, color="k", lw=0.8)
        axes[1].set(xlabel="LENS - original (points, paired)", title="settings where LENS might help")
        save(fig, "investigation.png")
    return made


def fmt_acc(s: dict) -> str:
    return f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}"


def fmt_diff(t: dict) -> str:
    p = "n/a" if t["p_ttest"] is None else f"{t['p_ttest']:.3f}"
    return f"{100 * t['mean']:+.2f} +- {100 * t['std']:.2f} (p={p}, {t['n_better']}/{t['n']} better)"


def results_table(t1: dict, min_effect: float, cmd: str) -> str:
    """Markdown: the paper's Best-of-16 number beside our held-out accuracy, paired diff and verdict."""
    lines = ["| dataset | method | factor | paper (Best-of-16 gold) | ours: accuracy % | ours: paired diff to original (points) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, d in t1.items():
        paper = PAPER.get("tldr" if "tldr" in name else "hh" if "hh" in name else "", {})
        lines.append(f"| {name} | original | 1x | {paper.get('original', '-')} | {fmt_acc(d['original'])} | - | - |")
        for m, fs in d["methods"].items():
            for f, r in fs.items():
                pv = paper.get(m, {}).get(int(f)) if paper else None
                delta = None if pv is None else pv - paper["original"]
                lines.append(f"| {name} | {m} | {f}x | {'-' if pv is None else pv} | {fmt_acc(r['augmented'])} | "
                             f"{fmt_diff(r['diff'])} | {verdict(r['diff'], delta, min_effect)} |")
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def main(args: Args) -> dict:
    if args.quick:
        # Quick results go to out/ (git-ignored) unless --out-dir is given; they share the caches.
        out_dir = "out/reproduce_quick" if args.out_dir == Args.out_dir else args.out_dir
        args = Args(**{**asdict(args), **QUICK, "datasets": args.datasets.split(",")[0], "out_dir": out_dir})
    sections = SECTIONS if args.sections == "all" else args.sections.split(",")
    if args.quick and args.sections == "all":
        sections = [s for s in SECTIONS if s != "embedders"]  # SmolLM2 is far too slow for a quick run
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"unknown section(s) {bad}; choose from {SECTIONS} or 'all'")
    if args.seeds < 1 or args.table1_seeds < 1 or args.n_seed < 2 or args.min_test < 1:
        raise UserError("--seeds and --table1-seeds must be >= 1, --n-seed >= 2, --min-test >= 1")
    for name in args.datasets.split(",") + [args.ablation_dataset]:
        if name not in DATASETS and not os.path.isfile(name):
            raise UserError(f"unknown dataset {name!r}: use one of {list(DATASETS)} or a file path")
        if name in DATASETS and not os.path.isfile(os.path.join(args.data_dir, DATASETS[name])):
            raise UserError(f"{name}: {os.path.join(args.data_dir, DATASETS[name])} not found (see --data-dir)")
    try:  # every grid must parse before hours of work start
        ints(args.factors), floats(args.sigma2s), floats(args.gammas), floats(args.betas), ints(args.seed_sizes)
    except ValueError as e:
        raise UserError(f"a grid flag is not a comma-separated list of numbers: {e}") from None
    if not set(args.methods.split(",")) <= {"lens", "direct", "gaussian"}:
        raise UserError(f"--methods must be a comma list of lens, direct, gaussian; got {args.methods!r}")
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(1)  # the VAE and RM are tiny: one thread is much faster on a shared CPU
    R, t_all, timing = Runner(args), time.perf_counter(), {}
    fns = {"table1": section_table1, "sigma2": lambda R: sweep(R, "sigma2", floats(args.sigma2s)),
           "gamma": lambda R: sweep(R, "gamma", floats(args.gammas)), "beta": lambda R: sweep(R, "beta", floats(args.betas)),
           "seed_size": section_seed_size, "composition": section_composition, "embedders": section_embedders,
           "investigate": section_investigate}
    results = {}
    for sec in sections:
        t0 = time.perf_counter()
        results[sec] = {**fns[sec](R), "grid": "quick" if args.quick else "full",
                        "seeds": args.table1_seeds if sec == "table1" else args.seeds}
        timing[sec] = time.perf_counter() - t0
        embed.atomic_json(results[sec], os.path.join(args.out_dir, f"{sec}.json"))
        print(f"reproduce: {sec} done in {timing[sec]:.0f}s", flush=True)
    # Figures and the table are redrawn from every section JSON present, not only this call's.
    everything = {}
    for sec in SECTIONS:
        p = os.path.join(args.out_dir, f"{sec}.json")
        if os.path.isfile(p):
            with open(p) as f:
                everything[sec] = json.load(f)
    figures = make_figures(everything, args.out_dir)
    cmd = ("python reproduce.py " + " ".join(sys.argv[1:])).strip() if sys.argv[0].endswith("reproduce.py") else "reproduce.main(...)"
    if "table1" in everything:
        with open(os.path.join(args.out_dir, "results_vs_paper.md"), "w") as f:
            f.write(results_table(everything["table1"]["datasets"], args.min_effect, cmd))
    total = time.perf_counter() - t_all
    # run_info.json keeps the timing of every section ever run into this folder (a section may
    # come from an earlier call), plus the embedding times, so the whole cost can be read off.
    info_path = os.path.join(args.out_dir, "run_info.json")
    info = {"calls": []}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    info["calls"] = info.get("calls", []) + [{"command": cmd, "sections": sections, "seconds": timing, "total_seconds": total,
                                              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}]
    # The largest time per section over calls: a call that reads finished runs back takes seconds.
    prev = info.get("section_seconds", {})
    info["section_seconds"] = {**prev, **{k: max(v, prev.get(k, 0)) for k, v in timing.items()}}
    info["embed_seconds"] = {f"{k[0]}/{k[1]}/L{k[2]}/{k[3] or 'all'}": v["meta"]["seconds"] for k, v in R.full.items()}
    info.update(args=asdict(args), figures=figures, torch=torch.__version__)
    embed.atomic_json(info, info_path)
    if "table1" in results:
        for name, d in results["table1"]["datasets"].items():
            for m, fs in d["methods"].items():
                for f, r in fs.items():
                    print(f"reproduce: {name} {m} {f}x: {fmt_acc(r['augmented'])}% vs original {fmt_acc(d['original'])}%, "
                          f"diff {fmt_diff(r['diff'])}")
    print(f"reproduce: {len(sections)} section(s) in {total / 60:.1f} min -> {args.out_dir}/ ({', '.join(figures)})")
    return {"results": results, "info": info, "args": asdict(args)}


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        sys.exit(2)
