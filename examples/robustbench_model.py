"""Monitor a RobustBench model: the real loading code, offline, from a local checkpoint.

RobustBench's ``load_model(name, model_dir, dataset, threat_model)`` reads
``{model_dir}/{dataset}/{threat_model}/{name}.pt`` and downloads the file only when
it is missing. This example never downloads: without the checkpoint it says how to
get one and exits with status 0 ("skipped").

Get the checkpoint once, on a machine with internet access (Wong2020Fast is a
PreActResNet-18, about 45 MB), then copy the ``models/`` folder here:

    python -c "from brittle.compat import import_robustbench; \\
        import_robustbench().utils.load_model('Wong2020Fast', model_dir='models', \\
        dataset='cifar10', threat_model='Linf')"

and the CIFAR-10 test set (``data/cifar-10-batches-py/``) with
``torchvision.datasets.CIFAR10('data', train=False, download=True)``. Then:

    python examples/robustbench_model.py --model-dir models --data-dir data --n 200

Fitting attacks ``--n`` test images with FAB, which dominates the run time: minutes
for a ResNet-18 on a CPU, much less on a GPU. ``--engine brittle`` (the default,
brittle's own FAB) is several times faster than ``--engine torchattacks`` (the
reference FAB). The same check from the shell:
``python -m brittle.check --model robustbench:Wong2020Fast --data cifar10``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.attacks.attack import DEFAULT_ENGINE, ENGINES
from brittle.compat import import_robustbench

# RobustBench's CIFAR budgets: 8/255 in Linf, 0.5 in L2.
EPS = {"Linf": 8 / 255, "L2": 0.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="Wong2020Fast", help="RobustBench model name")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    parser.add_argument("--threat-model", default="Linf", choices=sorted(EPS))
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="checkpoint root")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR test set root")
    parser.add_argument("--n", type=int, default=200, help="test images to attack")
    parser.add_argument("--steps", type=int, default=20, help="FAB steps per image")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES))
    parser.add_argument("--out", type=Path, default=Path("robustbench-monitor.pt"))
    args = parser.parse_args()

    checkpoint = args.model_dir / args.dataset / args.threat_model / f"{args.name}.pt"
    if not checkpoint.is_file():
        print(
            f"skipped: no checkpoint at {checkpoint}. RobustBench would download it; this "
            "example does not. Download it once where there is internet access:\n"
            f'  python -c "from brittle.compat import import_robustbench; '
            f"import_robustbench().utils.load_model({args.name!r}, model_dir='{args.model_dir}', "
            f"dataset='{args.dataset}', threat_model='{args.threat_model}')\"\n"
            "then run this script again with --model-dir pointing at that folder."
        )
        return 0

    # robustbench 1.1.1 does not import as published (pkg_resources, autoattack);
    # import_robustbench applies both fixes and returns the package.
    rb = import_robustbench()
    model = rb.utils.load_model(
        args.name,
        model_dir=str(args.model_dir),
        dataset=args.dataset,
        threat_model=args.threat_model,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"loaded {args.name} ({type(model).__name__}, {params / 1e6:.1f}M parameters)")

    # RobustBench models take images in [0, 1] and normalise inside, as brittle expects.
    eps = EPS[args.threat_model]
    monitor = brittle.wrap(model, norm=args.threat_model, eps=eps)
    probe = torch.rand(2, 3, 32, 32, device=device)
    with torch.inference_mode():
        out = monitor(probe)
    print(
        f"head {monitor.head_name!r}: {monitor.num_classes} classes, "
        f"{monitor.feature_dim} features; margins of two random images {out.margin.tolist()}"
    )

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[args.dataset]
    if not (args.data_dir / folder).is_dir():
        print(
            f"skipped fit: no {args.dataset} test set in {args.data_dir / folder} (RobustBench's "
            "loader would download it). Get it once with torchvision.datasets."
            f"{args.dataset.upper()}({str(args.data_dir)!r}, train=False, download=True)."
        )
        return 0
    from robustbench.data import load_cifar10, load_cifar100

    load = load_cifar10 if args.dataset == "cifar10" else load_cifar100
    x, y = load(n_examples=args.n, data_dir=str(args.data_dir))
    holdout = DataLoader(TensorDataset(x, y), batch_size=50)
    monitor.fit(holdout, steps=args.steps, engine=args.engine, pseudo=False)
    print(monitor.report)
    print(f"saved {monitor.save(args.out)}; reload with brittle.load({str(args.out)!r}, model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
