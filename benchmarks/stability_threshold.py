"""Gradient norms the stability filter measures on known layers, per seed: where its threshold
(1e8 by default, the paper's order of magnitude) falls between normalised and unnormalised
networks.

    python benchmarks/stability_threshold.py [--seeds 0,1,2,3,4] [--layers bn,bn_relu,...]
"""
from __future__ import annotations

import argparse

import torch

LAYERS = "bn,bn_relu,evonorm_s0,evonorm_b0,gn_relu,ln_relu,relu_only,identity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--layers", default=LAYERS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from opsearch import layers
    from opsearch.rejection import Candidate, FilterContext, RejectionPipeline

    pipeline = RejectionPipeline.from_spec(["stability"])
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| layer | " + " | ".join(f"seed {s}" for s in seeds) + " | min-max |")
    print("|---|" + "---:|" * (len(seeds) + 1))
    for name in args.layers.split(","):
        norms = []
        for seed in seeds:
            outcome = pipeline.run(Candidate(layers.resolve(name)), FilterContext(seed=seed))
            norms.append(float(outcome.verdicts[0].metrics.get("grad_norm", float("inf"))))
        print(f"| {name} | " + " | ".join(f"{n:.2g}" for n in norms)
              + f" | {min(norms):.2g}-{max(norms):.2g} |", flush=True)


if __name__ == "__main__":
    main()
