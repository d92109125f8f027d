"""Every exercise check accepts its reference solution and rejects typical mistakes with a
message that says what is wrong; an unsolved exercise prints instead of raising."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkit import exercises as ex

ALL = [e.name for e in ex.list_exercises()]  # every notebook's exercises (the package's modules register them)


@pytest.fixture(autouse=True)
def _own_progress_file(tmp_path, monkeypatch):
    """Checks record progress; keep it out of the user's cache."""
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))


def _run(capsys, name, fn, **kw):
    ok = ex.check(name, fn, **kw)
    return ok, capsys.readouterr().out


def _not_done(*args):
    raise NotImplementedError


@pytest.fixture
def tok(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_assets / "tiny" / "lm"))


def _kw(name, request):
    return {"tokenizer": request.getfixturevalue("tok")} if name == "label_mask" else {}


@pytest.mark.parametrize("name", ALL)
def test_reference_passes_and_unsolved_prints(name, capsys, request):
    kw = _kw(name, request)
    ok, out = _run(capsys, name, ex._reference(name), **kw)
    assert ok, out
    assert out.startswith("✓ correct"), out
    # an unsolved exercise: prints, never raises
    ok, out = _run(capsys, name, _not_done, **kw)
    assert not ok and "not written yet" in out and "solution(" in out
    ok, out = _run(capsys, name, lambda *a: None, **kw)
    assert not ok and "returned None" in out
    ok, out = _run(capsys, name, lambda *a: 1 / 0, **kw)
    assert not ok and "ZeroDivisionError" in out


@pytest.mark.parametrize("name", ALL)
def test_solution_prints_the_reference(name, capsys):
    ex.solution(name)
    out = capsys.readouterr().out
    defines = ex.EXERCISES[name].defines  # the function or class the student writes
    assert f"def {defines}(" in out or f"class {defines}(" in out
    with pytest.raises(KeyError, match="no exercise"):
        ex.solution("nope")


def test_count_image_tokens_mistakes(capsys):
    ok, out = _run(capsys, "count_image_tokens", lambda s, p, cls=False: (s if isinstance(s, int) else s[0]) ** 2 // p ** 2 + 1)
    assert not ok and "CLS token is not counted" in out
    ok, out = _run(capsys, "count_image_tokens", lambda s, p, cls=False: (s if isinstance(s, int) else s[0]) // p + cls)
    assert not ok and "one side of the grid" in out
    ok, out = _run(capsys, "count_image_tokens", lambda s, p, cls=False: (s if isinstance(s, int) else s[0]) ** 2 / p ** 2 + cls)
    assert not ok and "int" in out


def test_vqa_accuracy_mistakes(capsys):
    ok, out = _run(capsys, "vqa_accuracy", lambda P, A: sum(p == a for p, a in zip(P, A)) / max(1, len(A)))
    assert not ok and "case and punctuation" in out
    ok, out = _run(capsys, "vqa_accuracy", lambda P, A: 100.0 * sum(p == a for p, a in zip(P, A)) / max(1, len(A)))
    assert not ok and "percentage" in out
    ok, out = _run(capsys, "vqa_accuracy", lambda P, A: sum(p.strip().lower().strip(".") == a for p, a in zip(P, A)) / len(A))
    assert not ok and ("articles" in out or "divide by zero" in out or "ZeroDivisionError" in out)


def test_patchify_mistakes(capsys):
    def col_major(x, p):
        C, H, W = x.shape
        return x.reshape(C, H // p, p, W // p, p).permute(3, 1, 0, 2, 4).reshape(-1, C * p * p)

    def chan_last(x, p):
        C, H, W = x.shape
        return x.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape(-1, C * p * p)

    ok, out = _run(capsys, "patchify", col_major)
    assert not ok and "column by column" in out
    ok, out = _run(capsys, "patchify", chan_last)
    assert not ok and "(p, p, C)" in out
    ok, out = _run(capsys, "patchify", lambda x, p: x.reshape(-1, 3 * p * p))
    assert not ok and "patch" in out
    ok, out = _run(capsys, "patchify", lambda x, p: x[:, :8, :8])
    assert not ok and "expected shape (6, 192)" in out


def test_clip_loss_mistakes(capsys):
    def one_way(img, txt, s):
        L = s.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
        return F.cross_entropy(L, torch.arange(len(img)))

    def unnormalised(img, txt, s):
        L = s.exp() * img @ txt.t()
        t = torch.arange(len(img))
        return (F.cross_entropy(L, t) + F.cross_entropy(L.t(), t)) / 2

    def no_exp(img, txt, s):
        L = s * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
        t = torch.arange(len(img))
        return (F.cross_entropy(L, t) + F.cross_entropy(L.t(), t)) / 2

    ok, out = _run(capsys, "clip_loss", one_way)
    assert not ok and "only the image -> text" in out
    ok, out = _run(capsys, "clip_loss", unnormalised)
    assert not ok and "not L2-normalised" in out
    ok, out = _run(capsys, "clip_loss", no_exp)
    assert not ok and "logit_scale.exp()" in out
    ok, out = _run(capsys, "clip_loss", lambda i, t, s: ex._reference("clip_loss")(i, t, s).item())
    assert not ok and "return a tensor" in out


def test_label_mask_mistakes(capsys, tok):
    ref = ex._reference("label_mask")
    ok, out = _run(capsys, "label_mask", lambda ids, t: list(ids), tokenizer=tok)
    assert not ok and "should be -100 because it is not part of the assistant's answer" in out
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ok, out = _run(capsys, "label_mask",
                   lambda ids, t: [(-100 if i == end else l) for i, l in zip(ids, ref(ids, t))], tokenizer=tok)
    assert not ok and "must learn to stop" in out

    def shifted(ids, t):
        lab = ref(ids, t)
        return [(ids[k + 1] if lab[k] != -100 and k + 1 < len(ids) else lab[k]) for k in range(len(ids))]

    ok, out = _run(capsys, "label_mask", shifted, tokenizer=tok)
    assert not ok and "do not shift" in out
    image = tok.convert_tokens_to_ids("<image>")
    ok, out = _run(capsys, "label_mask",
                   lambda ids, t: [(i if i == image else l) for i, l in zip(ids, ref(ids, t))], tokenizer=tok)
    assert not ok and "image token" in out


def test_merge_image_tokens_mistakes(capsys):
    def per_row(ids, text, img, image_id):
        out = text.clone()
        flat = img.reshape(-1, img.shape[-1])
        for b in range(ids.shape[0]):
            pos = (ids[b] == image_id).nonzero().flatten()
            out[b, pos] = flat[: len(pos)]  # restarts at image 0 in every row
        return out

    ok, out = _run(capsys, "merge_image_tokens", per_row)
    assert not ok and "row by row" in out

    def zero_text(ids, text, img, image_id):
        out = torch.zeros_like(text)
        out[ids == image_id] = img.reshape(-1, img.shape[-1])
        return out

    ok, out = _run(capsys, "merge_image_tokens", zero_text)
    assert not ok and "text token" in out
    ok, out = _run(capsys, "merge_image_tokens",
                   lambda ids, text, img, i: torch.cat([text, img.reshape(1, -1, img.shape[-1]).expand(2, -1, -1)], 1))
    assert not ok and "keeps its length" in out


def test_registry():
    names = {e.notebook: [] for e in ex.list_exercises()}
    for e in ex.list_exercises():
        names[e.notebook].append(e.name)
    assert all(len(v) >= 2 for v in names.values()), names
    assert {"00_tour", "01_vision_encoder", "02_llava", "07_qlora"} <= set(names)


def test_each_notebook_has_its_own_module():
    """The framework lives in ``core``; each notebook's exercises in one module of their own,
    and notebooks 00-02's checks are importable from the package, as the notebooks do."""
    from mmkit.exercises import core

    modules = {}
    for e in ex.list_exercises():
        modules.setdefault(e.notebook, set()).add(e.check.__module__)
    assert all(len(m) == 1 for m in modules.values()), modules
    owners = [next(iter(m)) for m in modules.values()]
    assert len(set(owners)) == len(owners) and core.__name__ not in owners and ex.__name__ not in owners
    assert modules["00_tour"] == {"mmkit.exercises.tour"}
    assert modules["01_vision_encoder"] == {"mmkit.exercises.vision_encoder"}
    assert modules["02_llava"] == {"mmkit.exercises.llava"}
    for name in ("count_image_tokens", "vqa_accuracy", "patchify", "clip_loss", "label_mask", "merge_image_tokens"):
        assert getattr(ex, f"check_{name}") is ex.EXERCISES[name].check
    assert ex.check is core.check and ex.solution is core.solution and ex.register is core.register
    assert [e.notebook for e in ex.list_exercises()] == sorted(e.notebook for e in ex.list_exercises())


# ---------------------------------------------------------------- build-up exercises: typical wrong versions
def _edit(name, old, new):
    """The reference answer of ``name`` with one line changed: a typical wrong version."""
    from mmkit.exercises import core

    src = core._SOLUTIONS[name]
    assert old in src, (name, old)
    ns = {}
    exec(compile(src.replace(old, new), f"<wrong {name}>", "exec"), ns)
    return ns[name]


BUILD_UP_MISTAKES = [  # (exercise, line in the reference, the wrong line, words the verdict must say)
    ("MLPProjector", "self.act = nn.GELU()", "self.act = nn.ReLU()", "ReLU"),
    ("MLPProjector", "self.act = nn.GELU()", "self.act = nn.GELU(approximate='tanh')", "tanh approximation"),
    ("MLPProjector", "self.linear_2 = nn.Linear(lm_dim, lm_dim)", "self.proj = nn.Linear(lm_dim, lm_dim)",
     "missing linear_2"),
    ("QFormerLayer", "q = self.cross_attn_norm(q + self.cross_attn(q, image))", "pass", "never read the image"),
    ("QFormerLayer", "self.self_attn(h, mask=mask)", "self.self_attn(h)", "mask is ignored"),
    ("PerceiverBlock", "context=torch.cat([x_f, x], dim=1)", "context=x_f", "LN(latents)"),
    ("GatedXAttnDense", "y = y + torch.tanh(self.alpha_xattn) * x", "y = y + self.alpha_xattn * x", "tanh(alpha)"),
    ("GatedXAttnDense", "self.alpha_dense = nn.Parameter(torch.zeros(1))",
     "self.alpha_dense = nn.Parameter(torch.ones(1))", "initialise alpha_xattn and alpha_dense to zeros"),
    ("positions_2d", "[one_axis(half, cols.reshape(-1)), one_axis(half, rows.reshape(-1))]",
     "[one_axis(half, rows.reshape(-1)), one_axis(half, cols.reshape(-1))]", "halves are swapped"),
    ("patch_rows", "torch.cat([local, split], dim=2)", "torch.cat([split, local], dim=2)", "ends every row"),
    ("ema_update", "smoothed = (cluster_size + eps) / (n + K * eps) * n", "smoothed = cluster_size",
     "Laplace smoothing"),
    ("ema_update", "cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)",
     "cluster_size = (1 - decay) * cluster_size + decay * onehot.sum(0)", "swapped"),
    ("LoRALinear", "self.scaling = alpha / r", "self.scaling = alpha", "alpha / r"),
    ("LoRALinear", "nn.init.zeros_(self.lora_B.weight)", "pass", "initialise lora_B to zeros"),
    ("LoRALinear", "p.requires_grad_(False)", "pass", "freeze the base layer"),
]


@pytest.mark.parametrize("name,old,new,words", BUILD_UP_MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(BUILD_UP_MISTAKES)])
def test_build_up_mistakes(capsys, name, old, new, words):
    ok, out = _run(capsys, name, _edit(name, old, new))
    assert not ok and words in out, out


def test_build_up_exercise_in_every_family_notebook():
    """Every family notebook (02-08) has a build-up exercise: the student writes a module or the
    mechanism's core function, checked against the library with the library's weights."""
    built = {"MLPProjector": "02_llava", "QFormerLayer": "03_blip2_qformer", "PerceiverBlock": "04_flamingo",
             "GatedXAttnDense": "04_flamingo", "positions_2d": "05_qwen_vl_grounding",
             "patch_rows": "06_encoder_free", "LoRALinear": "07_qlora", "ema_update": "08_native"}
    assert {n: ex.EXERCISES[n].notebook for n in built} == built


def test_progress_and_reset(capsys, tmp_path):
    from mmkit.exercises import core
    from mmkit.paths import cache_dir

    assert cache_dir() == tmp_path / "cache"
    ex.check("MLPProjector", _not_done)
    ex.check("MLPProjector", ex._reference("MLPProjector"))
    ex.check_patchify(_not_done)  # a check imported by name records too
    capsys.readouterr()
    rows = ex.progress(show=True)
    out = capsys.readouterr().out
    assert rows["MLPProjector"]["solved"] and rows["MLPProjector"]["tries"] == 2
    assert not rows["patchify"]["solved"] and rows["patchify"]["tries"] == 1
    assert rows["LoRALinear"]["tries"] == 0 and "not tried" in out and "✓ solved" in out
    ex.reset("MLPProjector")
    assert ex.progress(show=False)["MLPProjector"]["tries"] == 0
    assert ex.progress(show=False)["patchify"]["tries"] == 1
    with pytest.raises(KeyError, match="no exercise"):
        ex.reset("nope")
    ex.reset()
    assert not any(r["tries"] for r in ex.progress(show=False).values())
    (cache_dir() / core.PROGRESS_FILE).write_text("{not json")  # a damaged file is a fresh start
    assert not any(r["tries"] for r in ex.progress(show=False).values())


def test_run_mode(monkeypatch):
    import mmkit
    from mmkit.paths import run_mode

    monkeypatch.delenv("SMOKE", raising=False)
    monkeypatch.delenv("MMKIT_MODE", raising=False)
    assert mmkit.mode("classroom") == "classroom" and mmkit.mode("Full") == "full" and mmkit.mode() == "classroom"
    monkeypatch.setenv("MMKIT_MODE", "full")
    assert run_mode("classroom") == "full"
    monkeypatch.setenv("SMOKE", "1")  # CI: SMOKE=1 forces smoke whatever the notebook says
    assert run_mode("full") == "smoke"
    monkeypatch.delenv("SMOKE")
    monkeypatch.delenv("MMKIT_MODE")
    with pytest.raises(ValueError, match="unknown run mode 'fast'.*'classroom'"):
        run_mode("fast")
