"""The ``mmkit`` command line.

    mmkit train --recipe llava-tiny [--out DIR] [--set key=value ...]
    mmkit chat  --checkpoint DIR --image PATH "question"
    mmkit eval  --checkpoint DIR --task vqa|pope|ground|caption|ocr [--split test] [--n N] [--json] [--blind | --oracle]
                [--few-shot vqa|color|shape|size --shots 0,2,4]
                [--parser strict|lenient|judge]  [--text-only: the LM alone, perplexity + reading]
    mmkit study captions|forgetting|loss [--only A,B] [--steps N] [--n N]   llava-tiny retrained per setting
    mmkit curves DIR [DIR ...] --out FIG.png   learning curves (train --curve) side by side
    mmkit demo [--checkpoint DIR ...] [--port N] [--share]   the chat demo in the browser
    mmkit zoo build [--out DIR]      retrain the tiny pre-trained ViT and LM from scratch
    mmkit zoo models [--only NAME]   train the family models the demo ships (assets/tiny/models)
    mmkit bench shapes               ShapesWorld samples per second
    mmkit bench memory [--target]    peak memory and s/iter: full / LoRA / QLoRA x sequence length
    mmkit bench speed                each bridge vs its transformers class (fwd+bwd), llava-tiny samples/s
    mmkit bench families [--minutes M]  the bake-off: every family, same data, same compute, one table
    mmkit bench resolution [--train-steps N] [--out DIR]   OCR / VQA / tokens / s per step: 64 px, pixel shuffle, tiles
    mmkit export --merge --checkpoint DIR --out OUT   LoRA folded into a plain LM
    mmkit recipes                    list the recipes
    mmkit env                        what torch sees (CUDA, bf16, bitsandbytes)

Multi-GPU: ``accelerate launch -m mmkit train --recipe ...`` (same arguments).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _print_json_last(obj: dict) -> None:
    print(json.dumps(obj, default=float))


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from mmkit.callbacks import CURVE, AccuracyTracker
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    recipe = apply_overrides(get_recipe(args.recipe), args.set)
    out = Path(args.out or f"runs/{recipe.name}")
    model = build_model(recipe)
    callbacks = []
    if args.curve:
        # a text-oracle recipe never sees a picture: its curve asks with the descriptions too
        oracle = all(st.describe for st in recipe.stages)
        callbacks.append(AccuracyTracker.every(args.curve, recipe.total_steps(), task=args.curve_task,
                                               n=args.curve_n, filename=CURVE, oracle=oracle))
    trainer = Trainer(model, recipe, out, callbacks=callbacks, progress=not args.quiet)
    trainer.train(resume=not args.restart)
    if trainer.is_main:
        print(f"saved {out / 'checkpoint'}")
        if args.curve:
            print(f"learning curve: {out / CURVE} (mmkit.viz.plot_learning_curves)")
        print(f"chat with it:  mmkit chat --checkpoint {out} --image PATH \"What colour is the circle?\"")
    return 0


# ---------------------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    from mmkit.data.images import load_image
    from mmkit.train import load_model

    model = load_model(args.checkpoint)
    images = [load_image(p) for p in (args.image or [])]
    if getattr(model, "writes_images", False):  # a native model may answer with a picture
        reply = model.generate(images, args.question, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, return_images=True)[0]
        print(reply["text"])
        out = Path(args.save_images)
        for i, im in enumerate(reply["images"]):
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"drawn_{i}.png"
            im.save(path)
            print(f"[picture {i + 1} saved to {path}]")
        return 0
    answer = model.generate(images, args.question, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature)[0]
    print(answer)
    return 0


# ---------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from mmkit.eval import evaluate, evaluate_few_shot, text_metrics
    from mmkit.train import load_model

    model = load_model(args.checkpoint)
    if args.text_only:  # the language model alone: did image training make it forget text?
        res = text_metrics(model, n=args.n, ppl_n=args.n, batch_size=args.batch_size)
    elif args.few_shot:  # interleaved prompts: the same queries after 0, 2, 4 solved examples
        shots = _shot_counts(args.shots)
        res = evaluate_few_shot(model, args.few_shot, shots, n=args.n, split=args.split, batch_size=args.batch_size)
    else:
        res = evaluate(model, args.task, split=args.split, n=args.n, blind=args.blind, oracle=args.oracle,
                       batch_size=args.batch_size, parser=args.parser)
    if args.json:
        _print_json_last(res)
        return 0
    per_type = res.pop("per_type", None) if args.task == "pope" and not args.text_only else None
    for k, v in res.items():
        print(f"{k:>12}: {v}")
    if per_type:  # POPE split by how the negatives were drawn
        print(f"\n{'negatives':>12}  {'n':>4}  {'accuracy':>8}  {'precision':>9}  {'recall':>6}  {'f1':>6}  yes-ratio")
        for kind, m in per_type.items():
            print(f"{kind:>12}  {m['n']:>4}  {m['accuracy']:>8.3f}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  "
                  f"{m['f1']:>6.3f}  {m['yes_ratio']:.3f}")
    return 0


def _shot_counts(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(k) for k in text.split(","))
    except ValueError:
        shots = ()
    if not shots or any(k < 0 or k > 8 for k in shots):
        raise SystemExit(f"eval: --shots {text!r}: give shot counts between 0 and 8, separated by commas, e.g. 0,2,4")
    return shots


# ---------------------------------------------------------------------------- study
def cmd_study(args: argparse.Namespace) -> int:
    from mmkit import studies

    fn = {"captions": studies.caption_style_study, "forgetting": studies.forgetting_study,
          "loss": studies.loss_study}[args.name]
    kw = {"out": args.out} if args.out else {}
    if args.settings and args.name == "loss":
        raise SystemExit("study loss: one run, no settings to choose; leave out --only")
    if args.settings:
        kw[{"captions": "styles", "forgetting": "modes"}[args.name]] = [s.strip() for s in args.settings.split(",")]
    try:
        rows = fn(steps=args.steps, n=args.n, **kw)
    except ValueError as err:
        raise SystemExit(f"study {args.name}: {err}") from None
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    _print_json_last({"study": args.name, "rows": rows})
    return 0


# ---------------------------------------------------------------------------- curves
def cmd_curves(args: argparse.Namespace) -> int:
    """Draw the learning curves of several runs (``curve.jsonl``) on one figure."""
    from mmkit.callbacks import load_curve
    from mmkit.viz import plot_learning_curves

    labels = args.label or [Path(d).name for d in args.dirs]
    if len(labels) != len(args.dirs):
        raise SystemExit(f"curves: {len(args.dirs)} folders but {len(labels)} --label; give one per folder or none")
    fig = plot_learning_curves({lab: load_curve(d) for lab, d in zip(labels, args.dirs)},
                               baseline=args.baseline, title=args.title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"saved {args.out}")
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Launch the Gradio chat demo on 127.0.0.1 (no training on start; see mmkit/demo.py)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
    from mmkit.demo import launch

    launch(args.checkpoint, port=args.port, share=args.share)
    return 0


# ----------------------------------------------------------------------------- zoo
def cmd_zoo(args: argparse.Namespace) -> int:
    from mmkit import zoo

    if args.action == "build":
        settings = {}
        for item in args.set or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"zoo build --set {item!r}: write KEY=VALUE, e.g. --set lm_steps=4000")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        report = zoo.build(out=args.out, smoke=args.smoke, only=args.only, settings=settings,
                           curve_every=args.curve)
        _print_json_last(report)
    elif args.action == "models":  # the trained family models the demo ships with
        names = [args.only] if args.only else list(zoo.SHIPPED_MODELS)
        _print_json_last(zoo.build_models(names, out=args.out, smoke=args.smoke, curve_every=args.curve))
    elif args.action == "info":
        _print_json_last(zoo.info())
    return 0


# --------------------------------------------------------------------------- bench
def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "shapes":
        from mmkit.data.shapes import benchmark

        res = benchmark(n=args.n or 2000, size=args.size, task=args.task)
        print(f"ShapesWorld: {res['samples_per_s']:.0f} samples/s at {args.size} px, task {args.task} (one core)")
        _print_json_last(res)
    elif args.what == "memory":
        from mmkit.bench import format_table, measure, memory_table

        if args.target:  # --target: one row only, QLoRA stage 2 at 512 tokens, batch 4
            rows = [measure("qlora", 512, size=args.model_size, batch=4, grad_accum=1, steps=args.steps)]
        else:
            rows = memory_table([m.strip() for m in args.methods.split(",")],
                                [int(x) for x in args.seq.split(",")], size=args.model_size,
                                batch=args.batch, grad_accum=args.grad_accum, steps=args.steps)
        ok = next((r for r in rows if "error" not in r), {})
        where = ok.get("gpu") or ok.get("device", "?")
        print(f"\nfine-tuning cost, {args.model_size} size, batch {rows[0].get('batch', args.batch)}, "
              f"grad-accum {rows[0].get('grad_accum', args.grad_accum)}, one image, on {where} "
              f"({ok.get('memory', '')}):\n")
        print(format_table(rows))
        _print_json_last({"rows": rows})
    elif args.what == "speed":
        from mmkit.bench import bridge_speed, format_speed, train_step_speed

        rows = bridge_speed(args.model_size, repeats=args.steps)
        print(f"\nforward + backward, {args.model_size} size, {torch_threads()} threads (median of {args.steps}):\n")
        print(format_speed(rows))
        step = train_step_speed("llava-tiny", steps=args.train_steps or 20)
        print(f"\nllava-tiny stage {step['stage']!r}: {step['samples_per_s']} samples/s "
              f"({step['s_per_step']} s per step of {step['batch']})")
        _print_json_last({"bridges": rows, "train_step": step})
    elif args.what == "families":
        from mmkit.bench import BAKEOFF, bake_off, format_bake_off

        names = [x.strip() for x in args.only.split(",")] if args.only else list(BAKEOFF)
        out = Path(args.out or "runs/bake-off")
        rows = bake_off(args.minutes, names, out=out, n=args.n or 200,
                        progress=not args.quiet)
        print(f"\nthe bake-off: {args.minutes:g} min of {torch_threads()} threads each, ShapesWorld test split\n")
        print(format_bake_off(rows))
        if args.figure:
            from mmkit import zoo
            from mmkit.viz import plot_learning_curves

            fig = plot_learning_curves({r["recipe"]: r["curve"] for r in rows}, baseline=zoo.info()["lm"]["blind_vqa"],
                                       baseline_label="blind LM",
                                       title=f"every family, {args.minutes:g} min of compute each")
            fig.savefig(args.figure, dpi=110, bbox_inches="tight")
            print(f"learning curves: {args.figure}")
        _print_json_last({"rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows]})
    elif args.what == "resolution":
        from mmkit.bench import format_resolution, resolution_bench

        steps = args.train_steps or 900
        n = args.n or 200
        res = resolution_bench(steps=steps, n=n, out_dir=args.out)
        print(f"\nsmall text at {res['scene_size']} px, {steps} steps per model, {n} test questions per task, "
              f"{torch_threads()} threads:\n")
        print(format_resolution(res["rows"]))
        if args.out:
            print(f"\nwritten: {Path(args.out) / 'resolution.json'}, {Path(args.out) / 'resolution.png'}")
        _print_json_last(res)
    return 0


# -------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from mmkit.train import export_merged

    if not args.merge:
        print("mmkit export: only --merge exists today (LoRA folded into a full-precision LM)", file=sys.stderr)
        return 2
    out = export_merged(args.checkpoint, args.out)
    print(f"merged model written to {out} (the LM alone: {out / 'lm'}, a plain transformers model)")
    print(f"chat with it:  mmkit chat --checkpoint {out} --image PATH \"What colour is the circle?\"")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from mmkit.recipes import RECIPES, get_recipe

    for name in sorted(RECIPES):
        r = get_recipe(name)
        stages = " -> ".join(f"{s.name}[{'+'.join(s.train)}] x{s.steps}" for s in r.stages)
        print(f"{name:<16} vision={r.vision:<36} lm={r.lm:<42} bridge={r.bridge:<10} {stages}")
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    if args.action == "export":
        from mmkit.course import export

        if bool(args.student) == bool(args.instructor):
            print("mmkit course export: give exactly one of --student OUT or --instructor OUT", file=sys.stderr)
            return 2
        role, out = ("student", args.student) if args.student else ("instructor", args.instructor)
        paths = export(out, role)
        print(f"{len(paths)} {role} notebooks written to {out}"
              + (" (no reference answers)" if role == "student" else " (exercises filled with the reference answers)"))
    elif args.action == "diagrams":
        from mmkit.viz.diagrams import save_bridge_diagrams

        for path in save_bridge_diagrams(args.out):
            print(path)
    elif args.action == "progress":
        from mmkit.exercises import progress

        progress()
    else:  # reset
        from mmkit.exercises import reset

        try:
            reset(args.name)
        except KeyError as e:
            print(f"mmkit course reset: {e.args[0]}", file=sys.stderr)
            return 2
        print(f"progress of {args.name or 'every exercise'} forgotten")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }
    try:
        import bitsandbytes as bnb

        from mmkit.quant import nf4_unavailable_reason

        info["bitsandbytes"] = bnb.__version__
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            info[f"4-bit NF4 on {dev}"] = nf4_unavailable_reason(dev) or "works"
    except Exception as e:  # pragma: no cover - depends on the machine
        info["bitsandbytes"] = f"unavailable ({e.__class__.__name__})"
    for k, v in info.items():
        print(f"{k:>15}: {v}")
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkit", description="Learn how multimodal LLMs work by building them.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("--recipe", required=True)
    t.add_argument("--out", help="output folder (default runs/RECIPE); training resumes from it")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    t.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--curve", type=int, default=0, metavar="N",
                   help="evaluate every N steps (and at the end) into OUT/curve.jsonl: accuracy, per type, "
                        "training minutes (a text-oracle recipe is asked with the descriptions)")
    t.add_argument("--curve-n", type=int, default=300, metavar="M", help="test questions per curve point")
    t.add_argument("--curve-task", default="vqa", help="the task the curve evaluates (vqa, pope, ...)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("chat", help="ask a trained model about an image")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--image", action="append", help="image path (repeat for several images)")
    c.add_argument("question")
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--save-images", default=".", metavar="DIR",
                   help="where a native model's drawings are saved (drawn_0.png, ...)")
    c.set_defaults(fn=cmd_chat)

    e = sub.add_parser("eval", help="evaluate a trained model on ShapesWorld")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--task", default="vqa", choices=["vqa", "pope", "ground", "caption", "ocr", "draw"],
                   help="ocr: exact match and character error rate; draw: text -> image, for models that "
                        "write images (unified-tiny)")
    e.add_argument("--split", default="test", choices=["train", "val", "test", "holdout"])
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--blind", action="store_true", help="ask without the image (the LM-only baseline)")
    e.add_argument("--oracle", action="store_true",
                   help="replace the image by the scene's text description (perfect perception, in words)")
    e.add_argument("--parser", default="lenient", choices=["strict", "lenient", "judge"],
                   help="how answers are read: exact string, normalised (default), or a model-free judge of free text")
    e.add_argument("--text-only", action="store_true",
                   help="the LM alone: held-out text perplexity and reading accuracy (forgetting)")
    e.add_argument("--few-shot", choices=["vqa", "color", "shape", "size"], default=None,
                   help="interleaved few-shot prompts instead of --task: Q/A documents (vqa) or one-word labels "
                        "of one-object scenes (color / shape / size), accuracy and format per shot count")
    e.add_argument("--shots", default="0,2,4", help="shot counts for --few-shot (default 0,2,4)")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(fn=cmd_eval)

    st = sub.add_parser("study", help="retrain llava-tiny per setting and compare (mmkit.studies)")
    st.add_argument("name", choices=["captions", "forgetting", "loss"],
                    help="captions: stage 1 caption style web/brief/detailed; forgetting: LM frozen/LoRA/full/"
                         "full with a text-only share; loss: answer loss vs VQA accuracy at checkpoints of one run")
    st.add_argument("--only", dest="settings", default=None,
                    help="comma-separated settings to run (captions: web,brief,detailed; forgetting: "
                         "frozen,lora,full,text); default all")
    st.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    st.add_argument("--n", type=int, default=300, help="test questions per metric")
    st.add_argument("--out", default=None, help="folder for the runs (default runs/study-NAME)")
    st.set_defaults(fn=cmd_study)

    k = sub.add_parser("curves", help="draw learning curves (mmkit train --curve) side by side")
    k.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or shipped models with a curve.jsonl")
    k.add_argument("--out", required=True, help="the figure's file (.png, .svg, .pdf)")
    k.add_argument("--label", action="append", help="a name per folder, in order (default: the folder names)")
    k.add_argument("--baseline", type=float, default=None, help="a dashed line, e.g. the blind accuracy")
    k.add_argument("--title", default="")
    k.set_defaults(fn=cmd_curves)

    d = sub.add_parser("demo", help="chat with a trained model in the browser (Gradio, offline)")
    d.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="a `mmkit train --out` folder to offer in the model picker (repeatable)")
    d.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: 7860 or the next free one)")
    d.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    d.set_defaults(fn=cmd_demo)

    z = sub.add_parser("zoo", help="the tiny pre-trained encoder and LM")
    z.add_argument("action", choices=["build", "models", "info"],
                   help="build: the tiny ViT + LM; models: train and ship the demo's family models")
    z.add_argument("--out", default=None, help="assets folder to write (default: the shipped assets/)")
    z.add_argument("--smoke", action="store_true", help="a seconds-long build, for tests")
    z.add_argument("--only", default=None,
                   help="build: vision | lm | vq; models: one recipe name (default: every shipped model)")
    z.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="build: override a build setting (mmkit.zoo.SETTINGS), e.g. --set lm_steps=4000")
    z.add_argument("--curve", type=int, default=0, metavar="N",
                   help="build: measure the LM's own reading every N LM steps (the report's lm_curve); "
                        "models: VQA every N steps, shipped as curve.jsonl beside the model")
    z.set_defaults(fn=cmd_zoo)

    b = sub.add_parser("bench", help="speed benchmarks that print their figures")
    b.add_argument("what", choices=["shapes", "memory", "speed", "families", "resolution"])
    b.add_argument("--n", type=int, default=None, help="shapes: samples (default 2000); families: test questions "
                                                       "(default 200); resolution: test questions per task (default 200)")
    b.add_argument("--minutes", type=float, default=3.0,
                   help="families: compute per family, minutes of the torch threads (CPU time)")
    b.add_argument("--only", default="", help="families: comma-separated recipes (default: every family)")
    b.add_argument("--out", default=None, help="families: folder for the runs (default runs/bake-off; resumes); "
                                               "resolution: folder for resolution.json and resolution.png")
    b.add_argument("--figure", default="", help="families: write the learning curves of all families here")
    b.add_argument("--quiet", action="store_true", help="families: no progress bars")
    b.add_argument("--train-steps", type=int, default=None,
                   help="speed: timed llava-tiny training steps (default 20); resolution: training steps per "
                        "model (default 900, llava-tiny's budget)")
    b.add_argument("--size", type=int, default=64, help="shapes: image size")
    b.add_argument("--task", default="vqa", help="shapes: task")
    b.add_argument("--model-size", default="real", choices=["real", "tiny"],
                   help="memory: SigLIP-B/16 + SmolLM2-360M-sized LM (real) or toy configs (tiny)")
    b.add_argument("--methods", default="full,lora,qlora", help="memory: comma-separated")
    b.add_argument("--seq", default="384,512,1024,2048", help="memory: sequence lengths, comma-separated")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--grad-accum", type=int, default=8)
    b.add_argument("--steps", type=int, default=3,
                   help="memory: optimizer steps (the first is not timed); speed: timed repeats per bridge")
    b.add_argument("--target", action="store_true",
                   help="memory: only the QLoRA row (512 tokens, batch 4, gradient checkpointing)")
    b.set_defaults(fn=cmd_bench)

    x = sub.add_parser("export", help="write a merged (LoRA folded in, not quantised) model")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true", help="fold the LoRA adapters into the LM weights")
    x.set_defaults(fn=cmd_export)

    co = sub.add_parser("course", help="the course pack: student / instructor notebooks, diagrams, progress")
    co.add_argument("action", choices=("export", "diagrams", "progress", "reset"))
    co.add_argument("name", nargs="?", default=None, help="reset: the exercise to forget (default: every one)")
    co.add_argument("--student", metavar="OUT", help="export: notebooks without reference answers")
    co.add_argument("--instructor", metavar="OUT", help="export: notebooks with every exercise solved")
    co.add_argument("--out", default="docs/course/img", help="diagrams: the folder for the PNGs")
    co.set_defaults(fn=cmd_course)

    r = sub.add_parser("recipes", help="list the recipes")
    r.set_defaults(fn=cmd_recipes)
    v = sub.add_parser("env", help="what torch sees on this machine")
    v.set_defaults(fn=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        # Errors of ours carry their fix in the message: show it without a traceback.
        if os.environ.get("MMKIT_DEBUG"):
            raise
        print(f"mmkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
