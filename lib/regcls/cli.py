"""Command line: ``regcls trace``, ``regcls merge``, ``regcls data download|list``, ``regcls plan``, ``regcls doctor``
(also ``python -m regcls``)."""
from __future__ import annotations

import argparse
import ast
import functools
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .bench import flops_per_image
from .cache import content_key, fill_shard, get_trace, model_reuse, profile_options, workload
from .data import DATASETS, SHIPPED, dataset_files, download_dataset, folder_images, scan_images
from .doctor import run as run_doctor
from .env import data_root, resolve_precision
from .errors import RegclsError
from .launch import array_shard, device_for, merge_parts, part_path, torchrun_world, wait_for
from .models import build, create, weights_id
from .profiles import ModelSpec, active_profile
from .runner import shard_range, trace_files
from .tracefile import merge_traces


def _parse_set(items: list[str]) -> dict:
    """``["depth=2", "embed_dim=48"]`` -> ``{"depth": 2, "embed_dim": 48}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RegclsError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def cmd_trace(args: argparse.Namespace) -> int:
    """``regcls trace``: one process, one shard of a job array (``--shard auto``) or a rank under torchrun."""
    if (args.images is None) == (args.dataset is None):
        raise RegclsError("give exactly one of --images DIR and --dataset NAME")
    world = torchrun_world()
    if world is not None and world.size > 1:
        if args.shard:
            raise RegclsError("under torchrun every rank takes its own shard: drop --shard")
        try:
            return _trace_rank(args, world)
        except RegclsError as e:   # one line naming the rank; torchrun then stops the others
            raise RegclsError(f"rank {world.rank}: {e}") from None
    if args.shard == "auto":   # a job-array task: its part beside --out, merged by 'regcls merge --wait'
        args.shard = array_shard()
        args.out = str(part_path(args.out, args.shard))
    return _trace(args, args.out, args.device, args.shard)


def _trace_rank(args: argparse.Namespace, world) -> int:
    """One torchrun rank: its shard into its own part (a finished part is kept on a rerun); rank 0 then waits for
    every part and merges them into ``--out``, which no other rank writes."""
    part = part_path(args.out, world.shard)
    if part.is_file():
        print(f"rank {world.rank}: {part.name} is finished", file=sys.stderr)
    else:
        _trace(args, str(part), device_for(world, args.device), world.shard)
    if world.rank == 0:
        merge_parts(args.out, world.size)
        print(f"wrote {args.out} from {world.size} ranks")
    return 0


def _trace(args: argparse.Namespace, out: str, device: str, shard: str | None) -> int:
    device, amp = resolve_precision(device, "bf16" if args.amp else args.precision)
    name = args.model
    arch, _, tag = name.partition(".")
    weights = "hub" if args.checkpoint is None and not args.random else f"random:{args.seed}"
    spec = ModelSpec(size="-", arch=arch, tag=tag or None, weights=weights,
                     overrides=tuple(sorted(_parse_set(args.set).items())))
    if args.images is not None:
        images, source = folder_images(args.images, args.limit or None), str(Path(args.images))
    else:
        images, source = dataset_files(args.dataset, args.limit), args.dataset
    head = images.files[:32]  # every shard checks bf16 on the request's first images: one precision for all parts
    request = content_key({"ids": images.ids})   # the whole request's images: parts of other requests do not merge
    if shard:
        images = images[slice(*shard_range(len(images), shard))]
    if args.strict:  # before any work: every file must decode
        bad = scan_images(images.files, progress=not args.quiet)
        if bad:
            raise RegclsError(f"{len(bad)} unreadable image files (--strict): "
                              + "; ".join(f"{Path(f).name} ({why})" for f, why in bad[:5])
                              + (" ..." if len(bad) > 5 else ""))
    model = build(spec, args.img_size, args.checkpoint)
    store = trace_files(model, images, out=out, img_size=args.img_size, batch_size=args.batch_size,
                        device=device, amp=amp, progress=not args.quiet, check_files=head if shard else None,
                        meta={"model": spec.name, "weights": weights_id(spec, args.checkpoint), "dataset": source,
                              "model_spec": spec.describe(), "shard": shard,
                              **({"request_ids_sha256": request} if shard else {})})
    out = Path(out)
    for f, why in store.skipped:
        print(f"skipped {f}: {why}", file=sys.stderr)
    skipped = f"; skipped {len(store.skipped)} unreadable files (listed above)" if store.skipped else ""
    print(f"wrote {out}: {len(store)} images{skipped}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``regcls merge``: the shard files given, or (``--parts K``) the K parts a job array wrote beside ``--out``;
    ``--wait`` first waits until every one is there."""
    if bool(args.shards) == bool(args.parts):
        raise RegclsError("give the shard files, or --parts K for the parts of a job array (regcls trace --shard auto)")
    if args.parts:   # the array's parts, intermediate files beside --out
        out = merge_parts(args.out, args.parts, timeout=args.timeout if args.wait else 0.0)
    else:
        if args.wait:
            wait_for([Path(s) for s in args.shards], timeout=args.timeout)
        out = merge_traces(args.shards, args.out)
    print(f"wrote {out} from {args.parts or len(args.shards)} shards")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, text in SHIPPED.items():
            print(f"{name:14s} shipped     {text}")
        for s in DATASETS.values():
            print(f"{s.name:14s} {s.size / 1e9:5.2f} GB  {s.description}\n{'':14s} {s.url}  {s.checksum}")
        print(f"data root: {data_root()}  (REGCLS_DATA)")
        return 0
    for name in args.names:
        print(f"{name}: {download_dataset(name, progress=not args.quiet)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What a profile would download and compute, without doing it: every model's weights, the datasets, and
    every trace the chapters read (:func:`regcls.cache.workload`)."""
    prof = active_profile(args.profile, verbose=False)
    print(f"profile {prof.name}: {prof.note}; {prof.img_size} px, batch {prof.batch_size or 'auto'}, "
          f"{'GPU if there is one, else CPU' if prof.device == 'auto' else prof.device}")
    jobs = workload(prof)
    models: dict[str, ModelSpec] = {}
    for j in jobs:
        models.setdefault(j.spec.name, replace(j.spec, testtime=None))   # one download per weights
    total_gb = 0.0
    for name, m in models.items():
        gb = 4 * _shape_of(m.arch, prof.img_size, m.overrides)[0] / 1e9
        total_gb += gb if m.weights == "hub" else 0
        src = f"hub: hf-hub:timm/{name} ({gb:.2f} GB)" if m.weights == "hub" else m.weights
        print(f"  model {m.label:11s} {name:45s} {src}")
    for ds, limit in ((prof.dataset, prof.limit), (prof.labelled, prof.labelled_limit)):
        if ds in DATASETS:
            s = DATASETS[ds]
            print(f"  data  {ds:14s} {s.size / 1e9:.2f} GB from {s.url} ({s.checksum}); images: {limit or 'all'}")
        else:
            print(f"  data  {ds:14s} {SHIPPED[ds]}")
    print(f"  {len(jobs)} traces (images as the full run traces them; forward PFLOP):")
    pflop = 0.0
    for j in jobs:
        crop = f", crop {j.crop_pct}" if j.crop_pct else ""
        n = prof.sample(j.dataset, capped=False, img_size=j.img_size)[0] or (
            DATASETS[j.dataset].n_images if j.dataset in DATASETS else len(dataset_files(j.dataset)))
        p = n * _shape_of(j.spec.arch, j.img_size, j.spec.overrides)[1] / 1e15
        pflop += p
        print(f"  trace {j.spec.label:11s} {j.spec.name:45s} {j.dataset} at {j.img_size} px{crop}, {n} images, "
              f"{p:.2f} PFLOP")
    print(f"  in all: {total_gb:.1f} GB of hub weights, {pflop:.1f} PFLOP")
    return 0


@functools.lru_cache(maxsize=None)
def _shape_of(arch: str, img_size: int, overrides: tuple) -> tuple[int, float]:
    """Parameters and forward FLOPs per image of a model, from a build on the meta device (no memory)."""
    with torch.device("meta"):
        model = create(arch, pretrained=False, img_size=img_size, overrides=dict(overrides))
    return sum(p.numel() for p in model.parameters()), flops_per_image(model)


def cmd_cache(args: argparse.Namespace) -> int:
    """``regcls cache``: compute every trace the chapters read on a profile into the cache, so that the book then
    builds from it; under torchrun each trace is shared among the ranks (``make book GPUS=N``)."""
    prof = active_profile(args.profile, verbose=False)
    world = torchrun_world()
    # a model's traces in a row (both datasets, the other crop): built once
    jobs = sorted(workload(prof), key=lambda j: (j.spec.name, j.img_size, content_key(j.spec.describe())))
    with model_reuse():
        return _fill(jobs, prof, world, args)


def _fill(jobs, prof, world, args) -> int:
    for n, job in enumerate(jobs, 1):
        opts = {**profile_options(prof, job.dataset, job.img_size), "img_size": job.img_size, "crop_pct": job.crop_pct,
                "progress": not args.quiet}
        try:
            if world is None or world.size == 1:
                get_trace(job.spec, job.dataset, **opts)
            else:
                fill_shard(job.spec, job.dataset, world, **{**opts, "device": device_for(world, opts["device"])})
        except RegclsError as e:
            raise RegclsError(f"{'' if world is None else f'rank {world.rank}: '}{job.spec.label} on {job.dataset}: "
                              f"{e}") from None
        if world is None or world.rank == 0:
            print(f"[{n}/{len(jobs)}] {job.spec.label} {job.spec.name} on {job.dataset} at {job.img_size} px", flush=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return run_doctor(trace=not args.no_trace)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regcls", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="one forward pass over images -> trace file (.npz)")
    t.add_argument("--model", required=True, help="timm ViT name, e.g. vit_giant_patch14_reg4_dinov2.lvd142m")
    t.add_argument("--checkpoint", help="local weights (timm or official DINOv2 format); else hub weights")
    t.add_argument("--random", action="store_true", help="random weights (seeded by --seed), for testing")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override for timm.create_model (e.g. depth=2), repeatable")
    t.add_argument("--images", help="folder of images (sorted file-name order)")
    t.add_argument("--dataset", help="dataset name (regcls data list)")
    t.add_argument("--limit", type=int, help="first N images")
    t.add_argument("--img-size", type=int, default=224)
    t.add_argument("--batch-size", type=int, help="images per batch (default: 16 on the CPU, as many as fit on a GPU)")
    t.add_argument("--device", default="auto", help="auto (a GPU when torch can use one, else the CPU), cpu, cuda or cuda:N")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: a lower precision on a GPU, float32 on the CPU; bf16: a lower precision anywhere. "
                        "The steps -- bfloat16 autocast where native, float16 autocast on any GPU, TF32 where "
                        "native -- are used only where they agree with float32 on the first images, else float32 "
                        "(the trace's own sums stay float32)")
    t.add_argument("--amp", action="store_true", help="the same as --precision bf16")
    t.add_argument("--strict", action="store_true", help="any unreadable image is an error")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--shard", help="i/k: trace only the i-th of k contiguous parts (0-based) into --out, merged with "
                   "'regcls merge'; auto: the part of this SLURM job-array task, written beside --out and merged "
                   "with 'regcls merge --wait --parts K --out ...'. Under torchrun every rank takes its own part "
                   "and rank 0 merges into --out.")
    t.add_argument("--out", required=True, help="trace file to write (.npz)")
    t.set_defaults(func=cmd_trace)
    m = sub.add_parser("merge", help="merge shard traces into one file")
    m.add_argument("shards", nargs="*", help="shard trace files, in shard order")
    m.add_argument("--out", required=True)
    m.add_argument("--parts", type=int, help="merge the K parts of a job array (regcls trace --shard auto) beside --out")
    m.add_argument("--wait", action="store_true", help="wait until every part is there")
    m.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (default: never)")
    m.set_defaults(func=cmd_merge)
    d = sub.add_parser("data", help="datasets: list, download")
    d.add_argument("action", choices=["download", "list"])
    d.add_argument("names", nargs="*")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_data)
    pl = sub.add_parser("plan", help="what a profile would download and compute (a dry run)")
    pl.add_argument("--profile", help="smoke, laptop, colab, paper or a profile file (.toml) of your own (default: REGCLS_PROFILE or detected)")
    pl.set_defaults(func=cmd_plan)
    ca = sub.add_parser("cache", help="compute every trace a profile's chapters read (under torchrun: on every GPU)")
    ca.add_argument("--profile", help="smoke, laptop, colab, paper or a profile file (.toml) of your own (default: REGCLS_PROFILE or detected)")
    ca.add_argument("--quiet", action="store_true", help="no progress bars")
    ca.set_defaults(func=cmd_cache)
    dr = sub.add_parser("doctor", help="is this machine ready for the real run? (driver, GPU, folders, hub, a GPU trace)")
    dr.add_argument("--no-trace", action="store_true", help="skip the 30-second trace on the GPU")
    dr.set_defaults(func=cmd_doctor)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # same clean stop as Ctrl-C; finished batches are kept
    warnings.filterwarnings("ignore", message="skipped ")  # printed as plain lines with the count instead
    try:
        return args.func(args)
    except RegclsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished batches are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
