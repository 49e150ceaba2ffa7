"""Two-stage training of the tiny LLaVA on generated scene QA.

End-to-end training of a ViT plus LM from scratch is far too slow on a CPU, so
training is split in two stages:

Stage 1 (vision tower alone, dense supervision). The CLIP tower is truncated
to the layers that feed the LM (the feature layer is ``-2``, i.e. the output of
encoder layer ``L-2``) and trained with
  * per-patch heads on the patch tokens: colour class (or "sign"), shape class,
    digit of the sign, whether the patch holds a shape's centre, and the patch's
    own grid row/column (so that position survives into the features);
  * global heads on the CLS token: total count, counts per colour and per
    shape, presence of every colour-shape pair, and the sign's digit. To answer
    them the CLS token has to attend to the objects, which is what makes the
    CLS attention of the feature layer a meaningful importance signal (as in
    real CLIP, where it drives methods such as FasterVLM or VisionZip).
The last encoder layer is kept (LLaVA runs it) but never reaches the LM.

Stage 2 (projector + LM). The tower is frozen; its feature-layer output is
cached once per image; several questions per image are trained against one
shared image prefix (the prefix's key/value cache is computed once and
repeated for each question, which is exactly equivalent to separate causal
passes, and several times cheaper). The projector's first layer is initialised
with the features' per-channel standardisation folded in (the residual stream
has a large shared offset). Besides the answer (and end-of-sequence) loss, a
small next-word loss on the question text gives every question position a
reason to look at the image, and an auxiliary attention loss (``attn_loss``)
asks that, in every LM layer but the first, at least one head of the answer
position ("ASSISTANT:") put its attention on the tokens of the objects the
question is about (known from the generator). Without it, the LM sat at the
answer prior for thousands of steps: one object's few tokens are diluted among
576 under near-uniform initial attention. The weights of that one query row are
recomputed from q and k captured by forward hooks; the model keeps SDPA.

Augmentation choice (visual-token subsets). A pre-LLM token reducer hands the
LM a subset of the 576 tokens in raster order with contiguous positions, so
RoPE positions no longer say where a token was; only the CLIP position
information carried in the features does. Stage 2 therefore mixes three kinds
of batches: all 576 tokens (the primary target; the rest of the batches after
the curriculum phase), object-preserving subsets (every token an object's box
touches plus random background tokens, ``object_prob``), and random subsets
(``drop_prob``). During the first ``curriculum`` fraction of stage 2 all
batches are object-preserving with little background: with few tokens the LM
finds objects much sooner, and these batches are several times cheaper. The
object-preserving subsets use ground-truth boxes only at training time; they
make the LM read position and content from the features instead of from
sequence positions. Reported accuracy is always measured with all tokens
first; reduced-token results are a benchmark, not a training target.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .build import PROMPT, TinyConfig, build_model, build_processor, pixel_values
from .scenes import (
    COLOR_NAMES,
    DIGITS,
    FAMILIES,
    GRID,
    MAX_OBJECTS,
    PATCH,
    PLURALS,
    SHAPES,
    Question,
    Scene,
    make_scene,
    questions_for,
)

Log = Callable[[str], None]
N_COUNT = MAX_OBJECTS + 1
# stage-2 sampling weights of the harder question families (others: 1.0)
FAMILY_WEIGHTS = {"count": 2.0, "relation": 1.5, "region": 1.25}


@dataclass
class TrainConfig:
    """Hyper-parameters of both stages (defaults: the shipped checkpoint)."""

    seed: int = 0
    stage1_steps: int = 500
    stage1_batch: int = 32
    stage1_lr: float = 1.5e-3
    stage2_images: int = 4000
    stage2_steps: int = 1600
    stage2_batch: int = 16
    questions_per_image: int = 8
    stage2_lr: float = 2e-3
    object_prob: float = 0.5
    drop_prob: float = 0.2
    curriculum: float = 0.3
    text_loss: float = 0.5
    attn_loss: float = 0.5
    drop_min_keep: int = 48
    bf16: bool = True
    threads: int | None = None
    log_every: int = 50


class VisionHeads(nn.Module):
    """Dense (per-patch) and global (CLS) supervision heads for stage 1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        n_col, n_shape, n_digit = len(COLOR_NAMES) + 2, len(SHAPES) + 1, len(DIGITS) + 1
        self.patch_sizes = (n_col, n_shape, n_digit, 1, 2)
        self.patch = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, sum(self.patch_sizes)))
        n_pairs = len(COLOR_NAMES) * len(SHAPES)
        self.global_sizes = (N_COUNT, N_COUNT * len(COLOR_NAMES), N_COUNT * len(SHAPES),
                             n_pairs, n_digit)
        self.cls = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
            nn.Linear(2 * dim, sum(self.global_sizes)),
        )

    def forward(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split head outputs: (patch logits list, global logits list)."""
        patch = self.patch(hidden[:, 1:]).float().split(self.patch_sizes, dim=-1)
        glob = self.cls(hidden[:, 0]).float().split(self.global_sizes, dim=-1)
        return list(patch), list(glob)


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Stage-1 targets of a batch of scenes."""
    def stack(attr: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(s, attr).reshape(-1) for s in scenes]))

    count = torch.tensor([len(s.shapes) for s in scenes])
    per_color = torch.tensor([[sum(o.color == c for o in s.shapes) for c in COLOR_NAMES]
                              for s in scenes])
    per_shape = torch.tensor([[sum(o.shape == k for o in s.shapes) for k in SHAPES]
                              for s in scenes])
    pairs = torch.tensor([[float(any(o.color == c and o.shape == k for o in s.shapes))
                           for c in COLOR_NAMES for k in SHAPES] for s in scenes])
    digit = torch.tensor([int(s.sign.digit) + 1 if s.sign else 0 for s in scenes])
    return {
        "color": stack("patch_color"), "shape": stack("patch_shape"),
        "digit": stack("patch_digit"), "center": stack("patch_center").float(),
        "count": count, "per_color": per_color, "per_shape": per_shape,
        "pairs": pairs, "sign": digit,
    }


_ROWCOL = torch.stack(torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij"),
                      dim=-1).reshape(-1, 2).float() / (GRID - 1)


def stage1_loss(heads: VisionHeads, hidden: torch.Tensor, t: dict[str, torch.Tensor]):
    """Sum of the dense and global stage-1 losses (and patch-colour accuracy)."""
    (p_col, p_shape, p_digit, p_center, p_pos), (g_count, g_col, g_shape, g_pairs, g_digit) = (
        heads(hidden)
    )
    ce = F.cross_entropy
    loss = ce(p_col.flatten(0, 1), t["color"].flatten())
    loss = loss + ce(p_shape.flatten(0, 1), t["shape"].flatten())
    loss = loss + ce(p_digit.flatten(0, 1), t["digit"].flatten())
    loss = loss + F.binary_cross_entropy_with_logits(
        p_center.squeeze(-1), t["center"], pos_weight=torch.tensor(20.0))
    loss = loss + 4.0 * F.mse_loss(p_pos, _ROWCOL.expand_as(p_pos))
    loss = loss + ce(g_count, t["count"])
    loss = loss + ce(g_col.reshape(-1, N_COUNT), t["per_color"].flatten())
    loss = loss + ce(g_shape.reshape(-1, N_COUNT), t["per_shape"].flatten())
    loss = loss + F.binary_cross_entropy_with_logits(g_pairs, t["pairs"])
    loss = loss + ce(g_digit, t["sign"])
    acc = {
        "patch_color": (p_col.argmax(-1) == t["color"]).float().mean().item(),
        "count": (g_count.argmax(-1) == t["count"]).float().mean().item(),
        "sign": (g_digit.argmax(-1) == t["sign"]).float().mean().item(),
    }
    return loss, acc


def vision_encoder(model) -> nn.Module:
    """The CLIP encoder (its ``layers`` list) of a LLaVA model, across transformers versions."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder


class TruncatedTower:
    """Context manager: the vision tower runs only up to the feature layer (-2)."""

    def __init__(self, model) -> None:
        self.encoder = vision_encoder(model)
        self.full = self.encoder.layers

    def __enter__(self):
        self.encoder.layers = nn.ModuleList(list(self.full)[:-1])
        return self

    def __exit__(self, *exc) -> None:
        self.encoder.layers = self.full


def feature_layer(model, pixels: torch.Tensor) -> torch.Tensor:
    """Hidden states of the feature layer (-2), CLS included: [B, 577, D]."""
    with TruncatedTower(model):
        out = model.model.vision_tower(pixel_values=pixels)
    return out.last_hidden_state


def _lr(step: int, total: int, peak: float) -> float:
    warmup = max(1, min(100, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def train_vision(model, cfg: TrainConfig, log: Log = print, device: str = "cpu") -> VisionHeads:
    """Stage 1: train the (truncated) vision tower with dense supervision."""
    dev = torch.device(device)
    torch.manual_seed(cfg.seed + 1)
    tower = model.model.vision_tower
    heads = VisionHeads(tower.config.hidden_size).to(dev)
    # the unused last layer and post-layernorm get no gradient: train only used params
    with TruncatedTower(model):
        used = {id(p) for p in tower.parameters()}
    params = [p for p in tower.parameters() if id(p) in used] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=0.05)
    tower.train()
    t0 = time.time()
    for step in range(cfg.stage1_steps):
        first = step * cfg.stage1_batch
        scenes = [make_scene("train", first + i) for i in range(cfg.stage1_batch)]
        pix = pixel_values([s.image for s in scenes]).to(dev)
        targets = {k: v.to(dev) for k, v in scene_targets(scenes).items()}
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.stage1_steps, cfg.stage1_lr)
        with _autocast(cfg, dev):
            hidden = feature_layer(model, pix)
        loss, acc = stage1_loss(heads, hidden.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.stage1_steps - 1:
            accs = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
            log(f"stage1 step {step} loss={loss.item():.4f} {accs} t={time.time() - t0:.0f}s")
    tower.eval()
    return heads


@dataclass
class QuestionBank:
    """Per image: its questions grouped by family (token ids of suffix and answer)."""

    per_image: list[dict[str, list[tuple[list[int], int, tuple[int, ...]]]]]
    object_masks: list[np.ndarray]  # per image [n_objects, 576] bool (box-touched patches)


class PromptCodec:
    """Splits the tokenized prompt into a constant prefix and a per-question suffix."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.prefix = self.split("?")[0]
        self._cache: dict[str, list[int]] = {}

    def split(self, question: str) -> tuple[list[int], list[int]]:
        """(ids before the image tokens, ids after them) for ``question``."""
        ids = self.tokenizer(PROMPT.format(question=question)).input_ids
        first = ids.index(self.image_id)
        last = len(ids) - 1 - ids[::-1].index(self.image_id)
        return ids[:first], ids[last + 1:]

    def suffix(self, question: str) -> list[int]:
        """Token ids after the image tokens (cached)."""
        if question not in self._cache:
            pre, post = self.split(question)
            if pre != self.prefix:
                raise ValueError(f"prompt prefix changed for {question!r}")
            self._cache[question] = post
        return self._cache[question]

    def answer_id(self, answer: str) -> int:
        """The single token id of ``answer``."""
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"answer {answer!r} is not a single known token")
        return ids[0]


def build_bank(scenes: list[Scene], codec: PromptCodec, seed: int) -> QuestionBank:
    """All questions of every family for each scene, tokenized."""
    per_image = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng((seed, i, 11))
        fams = {}
        for fam in FAMILIES:
            qs = questions_for(scene, fam, rng)
            if qs:
                fams[fam] = [(codec.suffix(q.question), codec.answer_id(q.answer),
                              question_objects(scene, q)) for q in qs]
        per_image.append(fams)
    return QuestionBank(per_image, [box_masks(s) for s in scenes])


def box_masks(scene: Scene) -> np.ndarray:
    """[n_objects, 576] bool: the patches each object's bounding box touches."""
    out = np.zeros((len(scene.objects), GRID, GRID), bool)
    for j, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.box
        out[j, y0 // PATCH:(y1 - 1) // PATCH + 1, x0 // PATCH:(x1 - 1) // PATCH + 1] = True
    return out.reshape(len(scene.objects), -1)


def question_objects(scene: Scene, q: Question) -> tuple[int, ...]:
    """Indices (into ``scene.objects``) of the objects a question is about."""
    w = q.question.split()
    objs = scene.objects

    def find(**attrs) -> tuple[int, ...]:
        return tuple(j for j, o in enumerate(objs) if o.kind == "shape"
                     and all(getattr(o, k) == v for k, v in attrs.items()))

    if q.family == "existence":
        return find(color=w[3], shape=w[4]) if q.answer == "yes" else ()
    if q.family == "color":
        return find(shape=w[-2])
    if q.family == "shape":
        return find(color=w[-3])
    if q.family == "count":
        if w[2] == "shapes":
            return find()
        if w[2] in COLOR_NAMES:
            return find(color=w[2])
        return tuple(j for j, o in enumerate(objs) if o.kind == "shape"
                     and PLURALS[o.shape] == w[2])
    if q.family == "relation":
        return find(color=w[2], shape=w[3]) + find(color=w[-3], shape=w[-2])
    if q.family == "region":
        return find(color=w[3], shape=w[4])
    return tuple(j for j, o in enumerate(objs) if o.kind == "sign")


@torch.no_grad()
def cache_features(model, scenes: list[Scene], batch: int = 64, device: str = "cpu",
                   bf16: bool = True) -> torch.Tensor:
    """Feature-layer outputs (CLS dropped) of every scene: [N, 576, D] bfloat16."""
    dev = torch.device(device)
    out = []
    for i in range(0, len(scenes), batch):
        pix = pixel_values([s.image for s in scenes[i:i + batch]]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(feature_layer(model, pix)[:, 1:].to(torch.bfloat16).cpu())
    return torch.cat(out)


def _sample_questions(bank: QuestionBank, idx: list[int], k: int, rng: np.random.Generator):
    rows = []
    for i in idx:
        fams = bank.per_image[i]
        names = sorted(fams)
        weights = np.array([FAMILY_WEIGHTS.get(f, 1.0) for f in names])
        for _ in range(k):
            fam = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            qs = fams[fam]
            if fam == "existence":  # balance yes / no
                want = bool(rng.random() < 0.5)
                qs = [q for q in qs if (q[1] == bank_yes_id(bank)) == want] or qs
            suffix, ans, objs = qs[int(rng.integers(0, len(qs)))]
            target = bank.object_masks[i][list(objs)].any(0) if objs else None
            rows.append((suffix, ans, target))
    return rows


def bank_yes_id(bank: QuestionBank) -> int:
    """Token id of "yes" (stored on the bank by ``train_language``)."""
    return bank.yes_id  # type: ignore[attr-defined]


def lm_answer_logits(model, codec: PromptCodec, image_embeds: torch.Tensor,
                     suffixes: list[list[int]], repeat: int = 1) -> tuple[torch.Tensor, list]:
    """Logits after each suffix for image-prefix embeddings shared by ``repeat`` questions.

    ``image_embeds``: projected visual tokens [B, K, D]. Returns the logits
    [B * repeat, S, V] of the right-padded suffixes and their lengths.
    """
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    b = image_embeds.shape[0]
    dev = image_embeds.device
    prefix_ids = torch.tensor(codec.prefix, device=dev)
    prefix = torch.cat([embed(prefix_ids)[None].expand(b, -1, -1).to(image_embeds.dtype),
                        image_embeds], dim=1)
    out = lm(inputs_embeds=prefix, use_cache=True)
    cache = out.past_key_values
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
    lens = [len(s) for s in suffixes]
    width = max(lens)
    ids = torch.full((len(suffixes), width), codec.pad_id, dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, : len(s)] = torch.tensor(s)
    ids = ids.to(dev)
    plen = prefix.shape[1]
    pos = (plen + torch.arange(width, device=dev))[None].expand(len(suffixes), -1)
    out2 = lm(inputs_embeds=embed(ids), past_key_values=cache, position_ids=pos, use_cache=False)
    return model.lm_head(out2.last_hidden_state), lens


def object_masks(scenes: list[Scene]) -> np.ndarray:
    """[N, 576] bool: patches touched by any object's bounding box (shapes and signs)."""
    return np.stack([box_masks(s).any(0) for s in scenes])


def _select_tokens(masks: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
                   progress: float = 1.0):
    """Kept visual-token indices [B, L] (raster order) for one batch, or None for all.

    With probability ``object_prob`` every image keeps all tokens its objects
    touch plus random background tokens, padded to a common length; with
    probability ``drop_prob`` a random subset of at least ``drop_min_keep``.
    Curriculum: during the first ``curriculum`` fraction of training
    (``progress`` in [0, 1]) every batch is object-preserving with few
    background tokens, so that the LM first learns to find objects among a
    handful of tokens.
    """
    warm = cfg.curriculum > 0 and progress < cfg.curriculum
    object_prob = 1.0 if warm else cfg.object_prob
    max_extra = 16 if warm else 96
    b, n = masks.shape
    r = rng.random()
    if r < object_prob:
        length = min(n, int(masks.sum(1).max()) + int(rng.integers(0, max_extra + 1)))
        rows = []
        for m in masks:
            obj, bg = np.flatnonzero(m), np.flatnonzero(~m)
            extra = rng.choice(bg, length - len(obj), replace=False)
            rows.append(np.sort(np.concatenate([obj, extra])))
        return np.stack(rows)
    if r < object_prob + cfg.drop_prob:
        keep = int(rng.integers(cfg.drop_min_keep, n + 1))
        return np.sort(np.stack([rng.choice(n, keep, replace=False) for _ in range(b)]), axis=1)
    return None


@torch.no_grad()
def standardize_projector(model, feats: torch.Tensor) -> None:
    """Fold per-channel feature standardisation into the projector's first linear layer.

    The feature layer's residual stream carries a large shared offset (about
    2.5x the token-to-token variation); a data-dependent init that removes it
    lets the LM tell visual tokens apart from the first step.
    """
    x = feats.float().flatten(0, 1)
    mu, sigma = x.mean(0), x.std(0).clamp(min=1e-3)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sigma)
    lin.bias.sub_(lin.weight @ mu)


def _question_loss(logits: torch.Tensor, suffixes: list[list[int]], lens: list[int]):
    """Mean next-token loss over the question words of each suffix (answer excluded)."""
    width = logits.shape[1]
    target = torch.full((len(suffixes), width), -100, dtype=torch.long)
    for r, (sfx, n) in enumerate(zip(suffixes, lens, strict=True)):
        target[r, : n - 2] = torch.tensor(sfx[1 : n - 1])  # up to "ASSISTANT:"
    return F.cross_entropy(logits.flatten(0, 1), target.to(logits.device).flatten(),
                           ignore_index=-100)


def train_language(model, codec: PromptCodec, feats: torch.Tensor, bank: QuestionBank,
                   cfg: TrainConfig, log: Log = print, device: str = "cpu",
                   masks: np.ndarray | None = None) -> None:
    """Stage 2: train projector + LM on cached features (tower frozen).

    ``masks``: per-image object masks (see ``object_masks``) for the
    object-preserving subsets; without them those batches use all tokens.
    """
    if masks is None:
        masks = np.ones((feats.shape[0], feats.shape[1]), bool)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng((cfg.seed, 22))
    bank.yes_id = codec.answer_id("yes")  # type: ignore[attr-defined]
    model.model.vision_tower.requires_grad_(False)
    standardize_projector(model, feats[:256])
    params = (list(model.model.multi_modal_projector.parameters())
              + list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.stage2_lr, weight_decay=0.01)
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    capture = AttentionCapture(model.model.language_model)
    n = feats.shape[0]
    order = rng.permutation(n)
    pos = 0
    t0 = time.time()
    k = cfg.questions_per_image
    for step in range(cfg.stage2_steps):
        if pos + cfg.stage2_batch > n:
            order, pos = rng.permutation(n), 0
        idx = [int(i) for i in order[pos:pos + cfg.stage2_batch]]
        pos += cfg.stage2_batch
        x = feats[idx].to(dev).float()
        sel = _select_tokens(masks[idx], cfg, rng, step / cfg.stage2_steps)
        if sel is not None:
            x = torch.gather(x, 1, torch.from_numpy(sel).to(dev)[..., None]
                             .expand(-1, -1, x.shape[-1]))
        rows = _sample_questions(bank, idx, k, rng)
        suffixes = [s + [a] for s, a, _ in rows]
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.stage2_steps, cfg.stage2_lr)
        with _autocast(cfg, dev), capture:
            img = model.model.multi_modal_projector(x)
            logits, lens = lm_answer_logits(model, codec, img, suffixes, repeat=k)
        logits = logits.float()
        r = torch.arange(len(rows), device=dev)
        last = torch.tensor(lens, device=dev)
        ans = torch.tensor([a for _, a, _ in rows], device=dev)
        ans_logits = logits[r, last - 2]  # prediction made at "ASSISTANT:"
        eos_logits = logits[r, last - 1]  # after the answer: end of sequence
        loss = F.cross_entropy(ans_logits, ans) + 0.2 * F.cross_entropy(
            eos_logits, torch.full_like(ans, codec.eos_id))
        if cfg.text_loss > 0:  # next-word loss on the question text (dense grounding signal)
            loss = loss + cfg.text_loss * _question_loss(logits, suffixes, lens)
        if cfg.attn_loss > 0:
            targets = _kept_targets([t for _, _, t in rows], sel, k, x.shape[1])
            attn_loss = capture.loss(targets, lens, len(codec.prefix))
            loss = loss + cfg.attn_loss * attn_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.stage2_steps - 1:
            acc = (ans_logits.argmax(-1) == ans).float().mean().item()
            extra = f" attn={attn_loss.item():.3f}" if cfg.attn_loss > 0 else ""
            log(f"stage2 step {step} loss={loss.item():.4f} acc={acc:.3f}{extra} "
                f"t={time.time() - t0:.0f}s")
    capture.remove()
    model.eval()


def _kept_targets(targets: list, sel: np.ndarray | None, k: int, n_img: int):
    """[B*K, n_img] bool targets restricted to the kept tokens (None rows: all False)."""
    out = torch.zeros(len(targets), n_img, dtype=torch.bool)
    for r, t in enumerate(targets):
        if t is None:
            continue
        t = torch.from_numpy(t)
        out[r] = t if sel is None else t[torch.from_numpy(sel[r // k])]
    return out


class AttentionCapture:
    """Forward hooks on LM attention layers 1.. that keep post-RoPE queries and cached keys.

    Used for an auxiliary loss on the answer position's attention: at least one
    head of each hooked layer should put its mass on the tokens of the objects
    the question is about. The model keeps its SDPA attention; the weights of
    the one query row are recomputed from q and k.
    """

    def __init__(self, lm: nn.Module) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb
        self.active = False
        self.store: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.handles = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
                        for layer in list(lm.layers)[1:]]

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self.handles:
            h.remove()

    def __enter__(self):
        self.active, self.store = True, []
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def _hook(self, module, args, kwargs, output) -> None:
        cache = kwargs.get("past_key_values")
        h = kwargs["hidden_states"]
        if not self.active or cache is None or h.shape[1] == 0:
            return
        keys = cache.layers[module.layer_idx].keys
        if keys.shape[2] == h.shape[1]:  # the prefix pass: nothing to supervise
            return
        b, s, _ = h.shape
        q = module.q_proj(h).view(b, s, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, _ = self._rope(q, q, cos, sin)
        self.store.append((q, keys, module.scaling))

    def loss(self, targets: torch.Tensor, lens: list[int], n_text: int) -> torch.Tensor:
        """Mean over hooked layers and rows with a target of -log(best head's target mass)."""
        rows = targets.any(-1).nonzero().flatten()
        if len(rows) == 0 or not self.store:
            return torch.zeros(())
        qpos = torch.tensor(lens)[rows] - 2  # the "ASSISTANT:" position
        n_img = targets.shape[1]
        total = torch.zeros(())
        for q, keys, scaling in self.store:
            plen = keys.shape[2] - q.shape[2]
            qr = q[rows, :, qpos].float()  # [R, H, d]
            scores = torch.einsum("rhd,rhkd->rhk", qr, keys[rows].float()) * scaling
            limit = plen + qpos
            visible = torch.arange(keys.shape[2])[None] <= limit[:, None]
            attn = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
            img = attn[..., n_text:n_text + n_img]
            mass = (img * targets[rows, None].to(img.dtype)).sum(-1)  # [R, H]
            total = total - torch.log(mass.max(-1).values + 1e-4).mean()
        return total / len(self.store)


def train_tiny_vlm(cfg: TrainConfig, tiny: TinyConfig | None = None, log: Log = print,
                   device: str = "cpu", tower_file: str | None = None):
    """Run both stages; returns (model in float32, processor, wall-time dict).

    ``tower_file``: if it exists, stage 1 is skipped and the vision tower is
    loaded from it (a previous run with the same config wrote it); otherwise
    the stage-1 tower is saved there. Useful to redo stage 2 alone.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tiny = tiny or TinyConfig()
    processor = build_processor()
    tokenizer = processor.tokenizer
    model = build_model(tiny, tokenizer, seed=cfg.seed).to(device)
    times: dict[str, float] = {}
    t0 = time.time()
    tower = model.model.vision_tower
    if tower_file and os.path.exists(tower_file):
        tower.load_state_dict(torch.load(tower_file, map_location=device))
        tower.eval()
        log(f"stage1 skipped: vision tower loaded from {tower_file}")
    else:
        train_vision(model, cfg, log, device)
        if tower_file:
            torch.save(tower.state_dict(), tower_file)
    times["stage1_s"] = time.time() - t0
    t1 = time.time()
    offset = 10_000_000  # stage-2 images are disjoint from stage-1 images
    scenes = [make_scene("train", offset + i) for i in range(cfg.stage2_images)]
    feats = cache_features(model, scenes, device=device, bf16=cfg.bf16)
    codec = PromptCodec(tokenizer)
    bank = build_bank(scenes, codec, cfg.seed)
    masks = object_masks(scenes)
    del scenes
    times["cache_s"] = time.time() - t1
    log(f"cached {tuple(feats.shape)} features in {times['cache_s']:.0f}s")
    t2 = time.time()
    train_language(model, codec, feats, bank, cfg, log, device, masks)
    times["stage2_s"] = time.time() - t2
    times["total_s"] = time.time() - t0
    return model.float().eval(), processor, times


@torch.no_grad()
def quick_eval(model, codec: PromptCodec, split: str = "val", n: int = 350,
               device: str = "cpu", batch: int = 50) -> dict[str, float]:
    """Per-family accuracy with all visual tokens, via the cached-prefix path (fast)."""
    from .scenes import scene_qa

    model.eval()
    samples = scene_qa(split, n)
    hits: dict[str, list[bool]] = {}
    for i in range(0, n, batch):
        chunk = samples[i:i + batch]
        pix = pixel_values([s.image for s in chunk]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            img = model.model.multi_modal_projector(feature_layer(model, pix)[:, 1:])
            logits, lens = lm_answer_logits(model, codec, img, [codec.suffix(s.question)
                                                                for s in chunk])
        pred = logits[torch.arange(len(chunk)), torch.tensor(lens) - 1].argmax(-1)
        for s, p in zip(chunk, pred.tolist(), strict=False):
            hits.setdefault(s.family, []).append(p == codec.answer_id(s.answer))
    acc = {f: float(np.mean(h)) for f, h in sorted(hits.items())}
    acc["overall"] = float(np.mean([x for h in hits.values() for x in h]))
    return acc
