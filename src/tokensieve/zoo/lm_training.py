"""Stage 2 of the tiny-VLM training: projector and language model.

The LM has to learn a two-hop circuit: gather what the question asks about
into the answer position ("ASSISTANT:"), then find the matching visual tokens
among 576 and read them. From the answer loss alone a small LM sits at the
answer prior for thousands of steps (measured: 46 % train accuracy after 700
steps even with perfect symbolic visual tokens). Two auxiliary losses teach
the hops directly, and take it to 85 % in the same 700 steps:

* a *question-content* probe: the answer position's hidden state after LM
  layer 0 must linearly predict the family and the colour/shape words of the
  question (hop 1);
* an *attention* loss: in every LM layer after the first, at least one head
  of the answer position must put its attention on the tokens of the objects
  the question is about (hop 2). For count questions the targets are the
  objects' marker patches (``Scene.patch_first``) plus the first prompt token,
  which serves as an attention sink: a head that splits its mass between n
  markers and the sink carries n, while one with all mass on the markers would
  not. The mass term alone does not ask for that split (``count_sink_weight`` does: off in the
  symbolic stages, on in the fine-tune, see ``AttentionCapture.loss`` and
  ``TrainConfig``). Questions with no object to
  look at (absent pairs, zero counts) target the sink alone.

Visual-token subsets. A pre-LLM reducer hands the LM a subset of the 576
tokens in raster order with contiguous positions, so RoPE positions stop
saying where a token was; only the position carried in the features does.
Training therefore mixes all 576 tokens with *object-preserving* subsets
(every patch an object's box touches plus a random number of background
patches), which also lets the LM find objects among few tokens early on. The
object-preserving subsets use ground-truth boxes at training time only.

Stage 2 runs in three steps (see ``tokensieve.zoo.train``): the LM is first
trained on symbolic visual tokens (embeddings of the per-patch labels the
vision tower was trained to produce; cheap, and independent of stage 1 so it
runs alongside it), then the projector is fitted to map tower features onto
those symbolic tokens, then projector and LM are fine-tuned on real features.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .build import PROMPT
from .parallel import SOLO, Team
from .scenes import (
    COLOR_NAMES,
    FAMILIES,
    GRID,
    NUM_PATCHES,
    PLURALS,
    SHAPES,
    TOTAL_COUNT_SHARE,
    Question,
    Scene,
    box_patches,
    questions_for,
)

Log = Callable[[str], None]
# sampling weights of the harder question families (others: 1.0)
FAMILY_WEIGHTS = {"count": 2.0, "relation": 2.0, "region": 1.25}
# question content: family, first colour, first shape, second colour, second shape (0 = none)
CONTENT_SIZES = (len(FAMILIES), len(COLOR_NAMES) + 1, len(SHAPES) + 1,
                 len(COLOR_NAMES) + 1, len(SHAPES) + 1)
_SHAPE_WORDS = {**{s: i + 1 for i, s in enumerate(SHAPES)},
                **{PLURALS[s]: i + 1 for i, s in enumerate(SHAPES)}}


@dataclass(frozen=True)
class BankQuestion:
    """One tokenized training question."""

    suffix: tuple[int, ...]  # token ids after the image tokens, up to "ASSISTANT:"
    answer: int  # answer token id
    family: str
    content: tuple[int, ...]  # see CONTENT_SIZES
    objects: tuple[int, ...]  # indices into scene.objects the question is about


@dataclass
class QuestionBank:
    """Every question of every family for each training image."""

    per_image: list[dict[str, list[BankQuestion]]]
    targets: list[dict[BankQuestion, np.ndarray]]  # [2, 1 + 576] (see attention_target)
    object_masks: np.ndarray  # [N, 576] bool: patches any object's box touches
    yes_id: int

    def head(self, n: int) -> QuestionBank:
        """The bank of the first ``n`` images."""
        return QuestionBank(self.per_image[:n], self.targets[:n], self.object_masks[:n],
                            self.yes_id)


class PromptCodec:
    """Splits the tokenized prompt into a constant prefix and a per-question suffix.

    ``placeholder`` / ``template``: the visual placeholder token and the prompt format (the
    image model's by default); ``strict``: refuse questions with unknown words.
    """

    def __init__(self, tokenizer, placeholder: str = "<image>", template: str = PROMPT,
                 strict: bool = False) -> None:
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(placeholder)
        self.template = template
        self.strict = strict
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.prefix = self.split("?")[0]
        self._cache: dict[str, tuple[int, ...]] = {}

    def split(self, question: str) -> tuple[list[int], list[int]]:
        """(ids before the placeholder tokens, ids after them) for ``question``."""
        ids = self.tokenizer(self.template.format(question=question)).input_ids
        first = ids.index(self.image_id)
        last = len(ids) - 1 - ids[::-1].index(self.image_id)
        return ids[:first], ids[last + 1:]

    def suffix(self, question: str) -> tuple[int, ...]:
        """Token ids after the placeholder tokens (cached)."""
        if question not in self._cache:
            pre, post = self.split(question)
            if pre != self.prefix:
                raise ValueError(f"prompt prefix changed for {question!r}")
            if self.strict and self.tokenizer.unk_token_id in post:
                raise ValueError(f"unknown word in {question!r}")
            self._cache[question] = tuple(post)
        return self._cache[question]

    def answer_id(self, answer: str) -> int:
        """The single token id of ``answer``."""
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"answer {answer!r} is not a single known token")
        return ids[0]


def question_content(q: Question) -> tuple[int, ...]:
    """Family and the (up to two) colour and shape words of ``q``, in order."""
    words = q.question.split()
    colors = [COLOR_NAMES.index(w) + 1 for w in words if w in COLOR_NAMES] + [0, 0]
    shapes = [_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS] + [0, 0]
    return (FAMILIES.index(q.family), colors[0], shapes[0], colors[1], shapes[1])


def box_masks(scene: Scene) -> np.ndarray:
    """[n_objects, 576] bool: the patches each object's bounding box touches."""
    out = np.zeros((len(scene.objects), GRID, GRID), bool)
    for j, o in enumerate(scene.objects):
        out[j][box_patches(o.box)] = True
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


def attention_target(scene: Scene, q: Question, objects: tuple[int, ...],
                     boxes: np.ndarray) -> np.ndarray:
    """[2, 1 + 576] bool: where heads of the answer position should look (index 0: the sink).

    Two target sets: a relation question needs one head on each object (a head
    on both would only see their mean position); other questions use the first.
    """
    target = np.zeros((2, 1 + NUM_PATCHES), bool)
    if q.family == "count":
        for j in objects:
            target[0, 1 + scene.first_patch(scene.objects[j])] = True
        target[0, 0] = True
    elif q.family == "relation" and len(objects) == 2:
        target[0, 1:], target[1, 1:] = boxes[objects[0]], boxes[objects[1]]
    elif objects:
        target[0, 1:] = boxes[list(objects)].any(0)
    else:
        target[0, 0] = True
    return target


def build_bank(scenes: list[Scene], codec: PromptCodec, seed: int) -> QuestionBank:
    """All questions of every family for each scene, tokenized, with their targets."""
    per_image, targets, masks = [], [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng((seed, i, 11))
        boxes = box_masks(scene)
        fams: dict[str, list[BankQuestion]] = {}
        tg: dict[BankQuestion, np.ndarray] = {}
        for fam in FAMILIES:
            for q in questions_for(scene, fam, rng):
                objs = question_objects(scene, q)
                bq = BankQuestion(codec.suffix(q.question), codec.answer_id(q.answer), fam,
                                  question_content(q), objs)
                fams.setdefault(fam, []).append(bq)
                tg[bq] = attention_target(scene, q, objs, boxes)
        per_image.append(fams)
        targets.append(tg)
        masks.append(boxes.any(0))
    return QuestionBank(per_image, targets, np.stack(masks), codec.answer_id("yes"))


def sample_questions(bank: QuestionBank, idx: list[int], k: int, rng: np.random.Generator,
                     total_count_share: float = TOTAL_COUNT_SHARE) -> list[BankQuestion]:
    """``k`` questions per image: families weighted, existence balanced yes/no.

    Count questions are the total count with probability ``total_count_share``,
    else uniform over all count questions; the default draws them as the
    benchmark does (``pick_question``). Uniform draws alone (share 0) ask the
    total, the hardest count, once in 11 count questions (the others are per
    colour and per shape, mostly 0-2), while the test split asks it in about
    half of them.
    """
    rows = []
    for i in idx:
        fams = bank.per_image[i]
        names = sorted(fams)
        weights = np.array([FAMILY_WEIGHTS.get(f, 1.0) for f in names])
        for _ in range(k):
            fam = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            qs = fams[fam]
            if fam == "existence":
                want = bool(rng.random() < 0.5)
                qs = [q for q in qs if (q.answer == bank.yes_id) == want] or qs
            if fam == "count" and total_count_share > 0 and rng.random() < total_count_share:
                qs = qs[:1]  # questions_for puts the total count first
            rows.append(qs[int(rng.integers(0, len(qs)))])
    return rows


def patch_labels(scenes: list[Scene]) -> torch.Tensor:
    """[N, 576, 5] int64 per-patch labels: colour, shape, digit, centre, first (see Scene)."""
    return torch.from_numpy(np.stack([
        np.stack([s.patch_color.ravel(), s.patch_shape.ravel(), s.patch_digit.ravel(),
                  s.patch_center.ravel(), s.patch_first.ravel()], -1) for s in scenes]))


class SymbolicTokens(nn.Module):
    """Visual tokens made from ground-truth patch labels and grid position.

    The sum of one learned embedding per label (the labels stage 1 teaches the
    vision tower to produce), per grid row and column, and a linear code of the
    (row, column) coordinates: with coordinates linear in the token, "left of"
    and "above" become a difference of two retrieved values, which the LM
    learns far sooner than from position lookup tables alone (the tower's
    features carry them linearly too: stage 1 regresses them). Trains the LM
    before the tower exists; the projector is then fitted to reproduce these
    tokens.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in
                                    (len(COLOR_NAMES) + 2, len(SHAPES) + 1, 11, 2, 2, GRID,
                                     GRID))
        self.coords = nn.Linear(2, dim, bias=False)

    def forward(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``labels`` [B, L, 5] of the patches at raster ``index`` [B, L] -> [B, L, dim]."""
        row, col = index // GRID, index % GRID
        parts = [*labels.unbind(-1), row, col]
        coords = torch.stack([row, col], -1).to(self.coords.weight.dtype) / (GRID - 1) - 0.5
        return sum(t(p) for t, p in zip(self.tables, parts, strict=True)) + self.coords(coords)


def select_tokens(masks: np.ndarray, rng: np.random.Generator, full_prob: float,
                  max_extra: int) -> np.ndarray:
    """Kept visual-token indices [B, L] (raster order) for one batch.

    With probability ``full_prob`` all tokens; otherwise every object patch
    plus up to ``max_extra`` random background patches (the same count for
    every image, so that the batch stays rectangular).
    """
    b, n = masks.shape
    if rng.random() < full_prob:
        return np.tile(np.arange(n), (b, 1))
    length = min(n, int(masks.sum(1).max()) + int(rng.integers(0, max_extra + 1)))
    rows = []
    for m in masks:
        obj, bg = np.flatnonzero(m), np.flatnonzero(~m)
        rows.append(np.sort(np.concatenate([obj, rng.choice(bg, length - len(obj),
                                                            replace=False)])))
    return np.stack(rows)


def lm_answer_logits(model, codec: PromptCodec, image_embeds: torch.Tensor,
                     suffixes: list, repeat: int = 1, hidden: bool = False):
    """Logits after each suffix for image-prefix embeddings shared by ``repeat`` questions.

    The prefix (prompt start + visual tokens) runs once and its key/value cache
    is repeated for the ``repeat`` questions of each image: exactly the causal
    forward of each full sequence, several times cheaper. Returns the logits
    [B * repeat, S, V] of the right-padded suffixes, their lengths and, with
    ``hidden``, the hidden states after LM layer 0.
    """
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    b = image_embeds.shape[0]
    dev = image_embeds.device
    prefix_ids = torch.tensor(codec.prefix, device=dev)
    prefix = torch.cat([embed(prefix_ids)[None].expand(b, -1, -1).to(image_embeds.dtype),
                        image_embeds], dim=1)
    cache = _output_cache(lm(inputs_embeds=prefix, use_cache=True))
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
    lens = [len(s) for s in suffixes]
    ids = torch.full((len(suffixes), max(lens)), codec.pad_id, dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, : len(s)] = torch.tensor(s)
    ids = ids.to(dev)
    pos = (prefix.shape[1] + torch.arange(ids.shape[1], device=dev))[None].expand(len(ids), -1)
    out = lm(inputs_embeds=embed(ids), **{_cache_name(lm): cache}, position_ids=pos,
             use_cache=False,
             output_hidden_states=hidden)
    logits = model.lm_head(out.last_hidden_state)
    return (logits, lens, out.hidden_states[1]) if hidden else (logits, lens)


def _cache_name(module: nn.Module) -> str:
    """The keyword a transformers forward takes the KV cache under: ``cache`` (transformers
    5.24 on; ``past_key_values`` is deprecated there) or ``past_key_values`` (earlier)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The KV cache a model output carries (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache


class AttentionCapture:
    """Forward hooks on LM attention layers 1.. that keep post-RoPE queries and cached keys.

    The model keeps its SDPA attention; the weights of the answer row are
    recomputed from q and k for the auxiliary attention loss.
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
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
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

    def loss(self, targets: torch.Tensor, answer_pos: torch.Tensor, n_text: int,
             count_sink_weight: float = 0.0) -> torch.Tensor:
        """Mean over hooked layers and target sets of -log(best head's mass on the set).

        ``targets`` [R, S, 1 + K] bool: S target sets over the sink (the first
        prompt token) and the K kept visual tokens (empty sets are skipped), or
        [R, L, S, 1 + K]: sets per hooked layer;
        ``answer_pos`` [R]: suffix index of the answer row.
        ``count_sink_weight`` c > 0: on count sets (the sink and n objects) the
        last layer's best head must also split its attention within the set as
        c : 1 : ... : 1, so its sink share c / (n + c) says n (the mass term
        alone lets a head put everything on the objects, which carries no count).
        """
        if not self.store or not targets.any():
            return torch.zeros(())
        total = torch.zeros(())
        rows = torch.arange(len(targets))
        # every hooked layer sees the same keys: one mask over them serves all layers,
        # unless the targets differ per layer ([R, L, S, 1 + K]: a two-hop lookup)
        n_keys = self.store[0][1].shape[2]
        per_layer = targets.dim() == 4

        def sets(tg: torch.Tensor):
            valid = tg.any(-1)  # [R, S]
            mask = torch.zeros(*tg.shape[:2], n_keys)
            mask[..., 0] = tg[..., 0].float()
            mask[..., n_text:n_text + tg.shape[-1] - 1] = tg[..., 1:].float()
            # count sets (the sink and n objects), split c : 1 : ... : 1 (see above)
            r, t = (tg[..., 0] & tg[..., 1:].any(-1)).nonzero(as_tuple=True)
            split = mask[r, t].clone()
            split[:, 0] *= count_sink_weight
            split = split / split.sum(-1, keepdim=True).clamp(min=1e-12)
            return valid, mask, r, t, split

        if not per_layer:
            valid, mask, r, t, split = sets(targets)
        for layer, (q, keys, scaling) in enumerate(self.store):
            if per_layer:
                valid, mask, r, t, split = sets(targets[:, layer])
                if not valid.any():
                    continue
            plen = keys.shape[2] - q.shape[2]
            qr = q[rows, :, answer_pos].float()  # [R, H, d]
            scores = torch.einsum("rhd,rhkd->rhk", qr, keys.float()) * scaling
            visible = torch.arange(keys.shape[2])[None] <= (plen + answer_pos)[:, None]
            attn = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
            mass = torch.einsum("rhk,rsk->rsh", attn, mask)  # [R, S, H]
            best_mass, best = mass.max(-1)
            total = total - torch.log(best_mass[valid] + 1e-4).mean()
            # the split only in the last layer. In the symbolic stage (every layer or the
            # last only) it lifted count accuracy but kept relation questions at chance;
            # the shipped recipe asks for it in the fine-tune only, once relations are learnt
            if count_sink_weight > 0 and layer == len(self.store) - 1 and len(r):
                share = attn[r, best[r, t]] / (best_mass[r, t, None] + 1e-6)  # [C, keys]
                # KL(split || share): zero at the target split, so the logged loss reads as a gap
                kl = (split * (torch.log(split.clamp(min=1e-12)) - torch.log(share + 1e-6)))
                total = total + kl.sum(-1).mean()
        return total / len(self.store)


@dataclass
class LMPhase:
    """One phase of LM training: where visual tokens come from and how many to keep."""

    name: str
    steps: int
    lr: float
    image_tokens: Callable[[list[int], torch.Tensor], torch.Tensor]  # (images, kept idx)
    params: list[nn.Parameter]
    full_prob: Callable[[float], float]  # progress in [0, 1] -> P(all 576 tokens)
    max_extra: Callable[[float], int]  # progress -> max background patches in a subset
    total_count_share: float = TOTAL_COUNT_SHARE  # see sample_questions


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up (10 %, at most 100 steps) then cosine decay to 5 % of ``peak``."""
    warmup = max(1, min(100, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train_lm(model, codec: PromptCodec, bank: QuestionBank, phase: LMPhase, probe: nn.Module,
             *, batch: int, questions_per_image: int, seed: int, attn_weight: float = 1.0,
             probe_weight: float = 1.0, count_sink_weight: float = 0.0, bf16: bool = True,
             log: Log = print, log_every: int = 100, team: Team = SOLO) -> None:
    """Train ``phase.params`` on the bank's questions (answer + EOS + auxiliary losses).

    ``team``: every member draws the same global batch (same generators) and
    trains on its part of the images; the leader logs the accuracy of its part.
    """
    lm = model.model.language_model
    dev = next(lm.parameters()).device
    rng = np.random.default_rng((seed, 22, len(phase.name)))
    torch.manual_seed(seed + 2)
    params = phase.params + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.01)
    capture = AttentionCapture(lm)
    lm.train()
    n, k = len(bank.per_image), questions_per_image
    order, pos = rng.permutation(n), 0
    hits: dict[str, list[bool]] = {}
    part = team.part(batch)
    t0 = time.time()
    try:
        for step in range(phase.steps):
            if pos + batch > n:
                order, pos = rng.permutation(n), 0
            idx = [int(i) for i in order[pos:pos + batch]]
            pos += batch
            progress = step / phase.steps
            sel = torch.from_numpy(select_tokens(bank.object_masks[idx], rng,
                                                 phase.full_prob(progress),
                                                 phase.max_extra(progress))).to(dev)
            rows = sample_questions(bank, idx, k, rng, phase.total_count_share)
            # this member's images and their questions (k per image, image-major)
            idx, sel, rows = idx[part], sel[part], rows[part.start * k:part.stop * k]
            suffixes = [list(q.suffix) + [q.answer] for q in rows]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, phase.steps, phase.lr)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16), capture:
                img = phase.image_tokens(idx, sel)
                logits, lens, h0 = lm_answer_logits(model, codec, img, suffixes, repeat=k,
                                                    hidden=True)
            r = torch.arange(len(rows), device=dev)
            apos = torch.tensor(lens, device=dev) - 2  # "ASSISTANT:" predicts the answer
            ans = torch.tensor([q.answer for q in rows], device=dev)
            ans_logits = logits[r, apos].float()
            loss = F.cross_entropy(ans_logits, ans) + 0.2 * F.cross_entropy(
                logits[r, apos + 1].float(), torch.full_like(ans, codec.eos_id))
            content = torch.tensor([q.content for q in rows], device=dev)
            parts = probe(h0[r, apos].float()).split(CONTENT_SIZES, dim=-1)
            probe_loss = sum(F.cross_entropy(p, content[:, j]) for j, p in enumerate(parts))
            keep = sel.repeat_interleave(k, 0).cpu()
            full = torch.stack([torch.from_numpy(bank.targets[i][q])
                                for i, q in zip(np.repeat(idx, k), rows, strict=True)])
            kept = torch.gather(full[..., 1:], 2, keep[:, None].expand(-1, 2, -1))
            targets = torch.cat([full[..., :1], kept], -1)
            attn_loss = capture.loss(targets, apos.cpu(), len(codec.prefix), count_sink_weight)
            loss = loss + probe_weight * probe_loss + attn_weight * attn_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            team.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if not team.leader:
                continue
            for q, ok in zip(rows, (ans_logits.argmax(-1) == ans).tolist(), strict=True):
                hits.setdefault(q.family, []).append(ok)
            if (step + 1) % log_every == 0 or step == phase.steps - 1:
                accs = " ".join(f"{f[:5]}={np.mean(h):.2f}" for f, h in sorted(hits.items()))
                total = np.mean([x for h in hits.values() for x in h])
                log(f"{phase.name} step {step + 1} loss={loss.item():.3f} "
                    f"probe={probe_loss.item():.3f} attn={attn_loss.item():.3f} "
                    f"len={sel.shape[1]} acc={total:.3f} [{accs}] t={time.time() - t0:.0f}s")
                hits = {}
    finally:
        capture.remove()
    lm.eval()


def content_probe(dim: int) -> nn.Module:
    """Linear probe of the question content (see CONTENT_SIZES)."""
    return nn.Linear(dim, sum(CONTENT_SIZES))
