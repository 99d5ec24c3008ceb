"""Stage 4 of LENS: a reward model on frozen embeddings, with and without the synthetic pairs.

Paper, Sec. 3.4. A small MLP r: R^d -> R is trained with the Bradley-Terry loss

    L_BT = -E_(e+, e-) [ w * log sigmoid(r(e+) - r(e-)) ]

over the seed pairs ("original") and over seed + synthetic pairs ("augmented", LENS when the
synthetic file came from synthesize.py --method lens). Both are trained over the same seeds and
scored on the same held-out pairs, so the difference is the effect of the synthetic data.

    python reward.py                         # original vs augmented with out/synthetic.pt, 5 seeds
    python reward.py --synthetic none        # original only

Writes `--out` (default out/reward.pt): {"meta", "model_args", "mean", "std", "models":
{"original": [state_dict per seed], "augmented": [...]}}; meta carries the embedder id,
pooling and max_length, so a later stage (rs_sft.py) can embed new text the same way and apply
the same standardisation. out/reward.json: {"original": {"test_accuracy_mean",
"test_accuracy_std", ...}, "augmented": {...}, "difference": {...}}.
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from embed import UserError, atomic_json, atomic_save, load_artifact
from vae import load_embeddings

SCHEMA = 1


@dataclass
class Args:
    embeddings: str = "out/embeddings.pt"
    synthetic: str = "out/synthetic.pt"  # or "none" for the original-only model
    out: str = "out/reward.pt"
    seeds: int = 5  # models per arm; results are mean +- std over these
    seed: int = 0  # first seed; the arms use seed, seed + 1, ...
    hidden: int = 256  # MLP hidden width. Deviation: the paper says only "a small MLP"
    epochs: int = 20  # passes over each arm's own training set (so a bigger arm takes more steps)
    steps: int = 0  # > 0: exactly this many optimizer steps for every arm instead of --epochs
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    synthetic_weight: float = 1.0  # w for synthetic pairs in L_BT (1 = plain union, as in the paper)
    threads: int = 1  # CPU threads; a model this small runs fastest on one


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


class RewardModel(nn.Module):
    def __init__(self, d_in: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # [n, d] standardised -> [n]
        return self.net(e).squeeze(-1)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weight=None) -> torch.Tensor:
    # Bradley-Terry: P(y+ > y-) = sigmoid(r+ - r-); loss = -log sigmoid(r+ - r-) = softplus(r- - r+)
    loss = F.softplus(r_rejected - r_chosen)
    return loss.mean() if weight is None else (weight * loss).sum() / weight.sum()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    """Accuracy with a strict '>': a tie counts as wrong, and ties are reported."""
    return {"accuracy": (r_chosen > r_rejected).float().mean().item(),
            "ties": int((r_chosen == r_rejected).sum().item())}


def train_reward_model(chosen, rejected, weight, args: Args, seed: int) -> RewardModel:
    """Minibatch Adam on L_BT; chosen/rejected [n, d] standardised, weight [n]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RewardModel(chosen.shape[1], args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.steps if args.steps > 0 else args.epochs * math.ceil(len(chosen) / args.batch_size)
    while steps > 0:
        perm = torch.randperm(len(chosen), generator=gen)
        for s in range(0, len(perm), args.batch_size):
            idx = perm[s : s + args.batch_size]
            loss = bt_loss(model(chosen[idx]), model(rejected[idx]), weight[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps -= 1
            if steps == 0:
                break
    return model.eval()


@torch.no_grad()
def evaluate(model: RewardModel, chosen, rejected) -> dict:
    rc, rr = model(chosen), model(rejected)
    return {**pairwise_accuracy(rc, rr), "bt_loss": bt_loss(rc, rr).item()}


def load_synthetic(path: str, d: int, n_train: int) -> dict:
    syn = load_artifact(path, "synthesize", "run synthesize.py, or pass --synthetic none")
    meta = syn["meta"]
    if syn["chosen"].shape[1] != d:
        raise UserError(f"embedding dimension mismatch: synthetic pairs have d={syn['chosen'].shape[1]}, the embeddings d={d}")
    if meta["n_seed_pairs"] != n_train:
        raise UserError(f"{path} was made from {meta['n_seed_pairs']} seed pairs, but the embeddings have {n_train}")
    if not (torch.isfinite(syn["chosen"]).all() and torch.isfinite(syn["rejected"]).all()):
        raise UserError(f"{path} contains NaN or inf embeddings")
    return syn


def mean_std(xs: list) -> tuple:
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def main(args: Args) -> dict:
    if args.steps < 0:
        raise UserError("--steps must be >= 0 (0 = use --epochs)")
    if args.seeds < 1 or args.epochs < 1 or args.hidden < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UserError("--seeds, --epochs, --hidden, --batch-size must be >= 1 and --lr > 0")
    if not (args.synthetic_weight > 0 and math.isfinite(args.synthetic_weight)):
        raise UserError("--synthetic-weight must be a positive number")
    torch.set_num_threads(max(1, args.threads))
    data = load_embeddings(args.embeddings)
    train, test = data["train"], data["test"]
    d, n = data["meta"]["d"], len(train["chosen"])

    # Standardise with the seed pairs' statistics (synthetic pairs live in the same raw space).
    both = torch.cat([train["chosen"], train["rejected"]])
    mean, std = both.mean(0), both.std(0).clamp(min=1e-6)
    norm = lambda x: (x - mean) / std  # noqa: E731
    arms = {"original": (norm(train["chosen"]), norm(train["rejected"]), torch.ones(n))}
    syn_meta = None
    if args.synthetic != "none":
        syn = load_synthetic(args.synthetic, d, n)
        syn_meta = syn["meta"]
        m = len(syn["chosen"])
        arms["augmented"] = (torch.cat([arms["original"][0], norm(syn["chosen"])]),
                             torch.cat([arms["original"][1], norm(syn["rejected"])]),
                             torch.cat([torch.ones(n), torch.full((m,), args.synthetic_weight)]))
    test_c, test_r = norm(test["chosen"]), norm(test["rejected"])

    results, models = {}, {}
    seeds = list(range(args.seed, args.seed + args.seeds))
    for arm, (c, r, w) in arms.items():
        runs, models[arm] = [], []
        for s in tqdm(seeds, desc=f"reward[{arm}]", unit="seed", file=sys.stderr):
            model = train_reward_model(c, r, w, args, s)
            runs.append({"seed": s, "train": evaluate(model, c, r), "test": evaluate(model, test_c, test_r)})
            models[arm].append({k: v.clone() for k, v in model.state_dict().items()})
        acc_m, acc_s = mean_std([x["test"]["accuracy"] for x in runs])
        results[arm] = {"test_accuracy_mean": acc_m, "test_accuracy_std": acc_s,
                        "test_bt_loss_mean": mean_std([x["test"]["bt_loss"] for x in runs])[0],
                        "train_accuracy_mean": mean_std([x["train"]["accuracy"] for x in runs])[0],
                        "test_ties_total": sum(x["test"]["ties"] for x in runs),
                        "n_train_pairs": len(c), "runs": runs}
    if "augmented" in results:
        diffs = [a["test"]["accuracy"] - o["test"]["accuracy"] for a, o in zip(results["augmented"]["runs"], results["original"]["runs"])]
        dm, ds = mean_std(diffs)
        results["difference"] = {"augmented_minus_original_mean": dm, "augmented_minus_original_std": ds,
                                 "seeds_augmented_better": sum(x > 0 for x in diffs)}

    meta = dict(stage="reward", schema=SCHEMA, embeddings=args.embeddings, synthetic=args.synthetic,
                synthetic_meta=syn_meta, embedder=data["meta"]["model"], pooling=data["meta"]["pooling"],
                max_length=data["meta"]["max_length"], dataset=data["meta"]["dataset"], d=d,
                n_test_pairs=len(test_c), seeds=seeds, args=asdict(args))
    ckpt = {"meta": meta, "model_args": {"d_in": d, "hidden": args.hidden}, "mean": mean, "std": std, "models": models}
    atomic_save(ckpt, args.out)
    atomic_json({**results, "meta": meta}, os.path.splitext(args.out)[0] + ".json")

    line = " | ".join(f"{arm}: {100 * r['test_accuracy_mean']:.2f} +- {100 * r['test_accuracy_std']:.2f}% "
                      f"({r['n_train_pairs']} pairs)" for arm, r in results.items() if arm != "difference")
    print(f"reward: held-out accuracy over {len(seeds)} seeds on {len(test_c)} pairs | {line}")
    if "difference" in results:
        r = results["difference"]
        print(f"reward: augmented - original = {100 * r['augmented_minus_original_mean']:+.2f} +- "
              f"{100 * r['augmented_minus_original_std']:.2f} points ({r['seeds_augmented_better']}/{len(seeds)} seeds better)")
    return results


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"reward.py: error: {e}", file=sys.stderr)
        sys.exit(2)
