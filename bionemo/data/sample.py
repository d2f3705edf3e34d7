"""A small synthetic protein set in BioNeMo's UniRef layout, for tests, debugging and smoke runs.

    python -m bionemo.data.sample --out data/sample [--clusters 3000] [--seed 0]

Each cluster has 1-6 members: a random seed sequence (member 0, the representative) and variants
of it with 5-20% of residues substituted. Residues follow the natural amino-acid composition and
lengths a log-normal spread (median 300, clipped to 30..2500, so ~2% exceed 1024 and get cropped).
Writes sequences.fasta and members.tsv into the out dir, then runs bionemo.data.prep on them.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bionemo.data.prep import prepare

# UniProtKB/Swiss-Prot amino-acid composition, percent (release statistics; they sum to ~100).
COMPOSITION = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07,
    "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56,
    "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip
LETTERS = np.frombuffer("".join(COMPOSITION).encode(), dtype=np.uint8)
FREQS = np.array(list(COMPOSITION.values())) / sum(COMPOSITION.values())

MEDIAN_LENGTH = 300  # typical UniRef50 protein length
LENGTH_SIGMA = 0.6  # log-space spread: P(length > 1024) = P(z > ln(1024/300)/0.6 = 2.05) ~ 2%
MIN_LENGTH, MAX_LENGTH = 30, 2500
MAX_MEMBERS = 6
SUBSTITUTION_RATE = (0.05, 0.20)  # per variant, drawn uniformly
FASTA_WIDTH = 60  # residues per FASTA line (UniProt's width), so prep parses multi-line records


def residues(rng: np.random.Generator, n: int) -> np.ndarray:
    return LETTERS[rng.choice(len(LETTERS), size=n, p=FREQS)]


def generate(out, n_clusters: int = 3000, seed: int = 0) -> tuple[Path, Path]:
    """Write out/sequences.fasta and out/members.tsv; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, n_clusters))
    lengths = np.clip(lengths.round(), MIN_LENGTH, MAX_LENGTH).astype(int)
    n_members = rng.integers(1, MAX_MEMBERS + 1, n_clusters)

    fasta_lines, tsv_lines = [], []
    for c in range(n_clusters):
        parent = residues(rng, lengths[c])
        cluster_id = f"UniRef50_SYN{c:05d}"
        for m in range(n_members[c]):
            seq = parent.copy()
            if m > 0:  # members after the representative are substituted variants
                hit = rng.random(len(seq)) < rng.uniform(*SUBSTITUTION_RATE)
                seq[hit] = residues(rng, int(hit.sum()))
            member_id = f"UniRef90_SYN{c:05d}M{m}"
            text = seq.tobytes().decode()
            fasta_lines.append(f">{member_id} synthetic cluster={cluster_id}")
            fasta_lines += [text[i : i + FASTA_WIDTH] for i in range(0, len(text), FASTA_WIDTH)]
            tsv_lines.append(f"{member_id}\t{cluster_id}")

    fasta, tsv = out / "sequences.fasta", out / "members.tsv"
    fasta.write_text("\n".join(fasta_lines) + "\n")
    tsv.write_text("\n".join(tsv_lines) + "\n")
    return fasta, tsv


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    fasta, tsv = generate(args.out, args.clusters, args.seed)
    # 2% held out: ~60 validation clusters for the default 3000, enough for a few eval batches.
    counts = prepare(fasta, args.out, tsv, valid_fraction=0.02, seed=args.seed)
    print(
        f"{counts['sequences']} sequences in {counts['clusters']} clusters "
        f"({counts['train_clusters']} train, {counts['valid_clusters']} valid) -> {args.out} "
        f"in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
