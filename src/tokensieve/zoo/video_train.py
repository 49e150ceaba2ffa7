"""Training of the tiny video VLM (see ``scripts/train_tiny_video_vlm.py``).

The OneVision model starts from the shipped tiny LLaVA (tower, projector and
LM weights copied, see :func:`tokensieve.zoo.video_build.build_video_model`).
Tower and projector stay frozen, so the pooled projected frame features of
every training clip are computed once and cached ([8 x 144, 128] per clip);
each clip then serves several questions. The LM (and ``image_newline``)
learns with AdamW under bf16 autocast; the prompt prefix with the 1153 video
tokens runs once per clip and its KV cache is repeated for the clip's
questions (:func:`tokensieve.zoo.lm_training.lm_answer_logits`).

As for the image model, an auxiliary loss on the answer position's attention
(:class:`tokensieve.zoo.lm_training.AttentionCapture`) tells the LM where to
look: in every LM layer after the first, one head of the answer position puts
its mass on the tokens of the objects the question is about (for counts: each
present object's first token in the asked frame plus the first prompt token,
the attention sink; for ``order``: one head on each of the two appearing
objects).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .clips import (
    CLIP_FAMILIES,
    NUM_FRAMES,
    TOKENS_PER_FRAME,
    VIDEO_TOKENS,
    Clip,
    ClipQuestion,
    all_questions,
    make_clip,
)
from .lm_training import AttentionCapture, PromptCodec, lm_answer_logits, lr_at
from .video_build import VIDEO_PROMPT, VIDEO_TOKEN

Log = Callable[[str], None]
FAMILY_WEIGHTS = {"moved": 1.5, "direction": 1.5, "appeared": 1.5, "vanished": 1.5,
                  "order": 2.0, "count_time": 2.0, "color": 0.75, "shape": 0.75}


@dataclass
class VideoTrainConfig:
    """Sizes and schedule of the video LM training."""

    clips: int = 3000  # training clips (features cached once)
    steps: int = 2000
    batch: int = 8  # clips per step
    questions_per_clip: int = 12
    lr: float = 1e-3
    attn_weight: float = 1.0
    train_newline: bool = True
    bf16: bool = True
    seed: int = 0
    log_every: int = 50
    val: int = 160  # val samples for the periodic check (cached features)
    val_every: int = 300
    full_prob: float = 0.35  # share of steps on all 1153 video tokens (else object subsets)
    max_extra: float = 0.25  # subsets: at most this share of the other tokens added
    temporal_weight: float = 1.0  # layer-0 "where was this cell" loss (TemporalCapture)
    renumber_prob: float = 0.2  # subsets: share given contiguous positions (as ts.apply does)
    focus: str = ""  # comma-separated families drawn 3x as often (a second, shorter schedule)
    last_frame: bool = False  # order / appeared / vanished targets on the last frame only
    two_hop: bool = False  # vanished: layer 1 on what is there at the end, layer 2 on it

    def family_weights(self) -> dict[str, float]:
        """FAMILY_WEIGHTS with the ``focus`` families tripled (unknown names refused)."""
        names = [f for f in self.focus.split(",") if f]
        bad = sorted(set(names) - set(FAMILY_WEIGHTS))
        if bad:
            raise ValueError(f"focus: unknown families {bad}; expected some of "
                             f"{sorted(FAMILY_WEIGHTS)}")
        return {f: w * (3.0 if f in names else 1.0) for f, w in FAMILY_WEIGHTS.items()}

    def to_dict(self) -> dict:
        """Plain dict (for logs)."""
        return asdict(self)


class VideoCodec(PromptCodec):
    """Splits the tokenized video prompt (one ``<video>`` placeholder) into a constant prefix
    and a per-question suffix; questions with unknown words are refused."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, VIDEO_TOKEN, VIDEO_PROMPT, strict=True)
        self.video_id = self.image_id


def two_hop_target(clip: Clip, q: ClipQuestion, masks: np.ndarray,
                   target: np.ndarray) -> np.ndarray:
    """[2, 2, 1 + 1153]: ``target`` for both hooked LM layers, except ``vanished``: layer 1
    looks at every object of the last frame (the colours still there), layer 2 at the
    vanished object's own tokens (the frame-0 object whose colour is not among them)."""
    out = np.stack([target, target])
    if q.family == "vanished":
        n = NUM_FRAMES * TOKENS_PER_FRAME
        at_end = [j for j, o in enumerate(clip.objects) if o.present(NUM_FRAMES - 1)]
        grid = masks[at_end].any(0).reshape(NUM_FRAMES, TOKENS_PER_FRAME)
        end = np.zeros_like(grid)
        end[-1] = grid[-1]
        out[:, :, 1:] = False
        out[0, 0, 1:1 + n] = end.reshape(-1)
        out[1, 0, 1:1 + n] = masks[q.objects[0]]
    return out


def attention_target(clip: Clip, q: ClipQuestion, masks: np.ndarray,
                     last_frame: bool = False) -> np.ndarray:
    """[2, 1 + 1153] bool: where heads of the answer position should look (0: the sink).

    ``masks``: :meth:`Clip.token_masks`. Counts: each present object's first token in
    the asked frame plus the sink; ``order``: the asked object, then the other one.
    ``last_frame``: ``order``, ``appeared`` and ``vanished`` look at the last frame only,
    whose tokens carry the most history (the whole onset, the cell's occupancy).
    """
    target = np.zeros((2, 1 + VIDEO_TOKENS), bool)
    n = NUM_FRAMES * TOKENS_PER_FRAME
    if q.family == "count_time":
        frame = 0 if q.question.split()[-2] == "start" else NUM_FRAMES - 1
        lo = frame * TOKENS_PER_FRAME
        for j in q.objects:
            first = int(np.flatnonzero(masks[j, lo:lo + TOKENS_PER_FRAME])[0])
            target[0, 1 + lo + first] = True
        target[0, 0] = True
    elif q.family == "order":
        target[0, 1:1 + n], target[1, 1:1 + n] = masks[q.objects[0]], masks[q.objects[1]]
    elif q.family == "vanished":
        # its cells in the frames it is gone from: only there does a token (by its layer-0
        # "first frame" head) differ from a static object's; its value still carries the
        # object's look from frame 0. Its own tokens look static to a causal LM.
        (j,) = q.objects
        grid = masks[j].reshape(NUM_FRAMES, TOKENS_PER_FRAME)
        gone = np.zeros_like(grid)
        gone[clip.objects[j].event_frame:] = grid.any(0)
        target[0, 1:1 + n] = gone.reshape(-1)
    elif q.objects:
        target[0, 1:1 + n] = masks[list(q.objects)].any(0)
    else:
        target[0, 0] = True
    if last_frame and q.family in ("order", "appeared", "vanished"):
        cells = masks[list(q.objects)].reshape(len(q.objects), NUM_FRAMES,
                                               TOKENS_PER_FRAME).any(1)
        last = 1 + (NUM_FRAMES - 1) * TOKENS_PER_FRAME
        target[:, 1:] = False
        for h in range(len(q.objects) if q.family == "order" else 1):
            target[h, last:last + TOKENS_PER_FRAME] = cells[h] if q.family == "order" \
                else cells.any(0)
    return target


@dataclass(frozen=True)
class BankItem:
    """One tokenized training question of a clip."""

    suffix: tuple[int, ...]
    answer: int
    family: str
    target: int  # index into the clip's target list


def build_bank(clips: Sequence[Clip], codec: VideoCodec, last_frame: bool = False,
               two_hop: bool = False):
    """Per clip: questions by family, and the stacked attention targets [Q, 2, 1 + 1153]
    (:func:`attention_target`), or [Q, 2 layers, 2, 1 + 1153] with ``two_hop``."""
    bank, targets = [], []
    for clip in clips:
        masks = clip.token_masks()
        fams: dict[str, list[BankItem]] = {}
        tg = []
        for q in all_questions(clip):
            item = BankItem(codec.suffix(q.question), codec.answer_id(q.answer), q.family,
                            len(tg))
            target = attention_target(clip, q, masks, last_frame)
            tg.append(two_hop_target(clip, q, masks, target) if two_hop else target)
            fams.setdefault(q.family, []).append(item)
        bank.append(fams)
        targets.append(np.stack(tg))
    return bank, targets


#: LM layer-0 heads taught (TemporalCapture) where the same cell was: in frame 0, in the
#: previous frame, and in every frame so far (uniformly); the fourth head is free.
TEMPORAL_SETS = ("first", "previous", "history")


def temporal_masks(kept: torch.Tensor) -> torch.Tensor:
    """[B, 3, L, L] bool: for each kept video token (query) the kept tokens of the same cell
    in frame 0, in the previous frame (frame 0: itself) and in every frame up to its own.

    ``kept`` [B, L]: video-token indices (frame-major; the newline, 1152, takes no part).
    """
    n = NUM_FRAMES * TOKENS_PER_FRAME
    video = kept < n
    frame, cell = kept // TOKENS_PER_FRAME, kept % TOKENS_PER_FRAME
    fq, fk = frame[:, :, None], frame[:, None, :]
    same = ((cell[:, :, None] == cell[:, None, :]) & (fk <= fq)
            & video[:, :, None] & video[:, None, :])
    return torch.stack([same & (fk == 0), same & (fk == (fq - 1).clamp(min=0)), same], 1)


class TemporalCapture:
    """A forward hook on LM layer 0's attention that keeps the prefix pass's post-RoPE q and k
    of the heads in :data:`TEMPORAL_SETS`, for :meth:`loss`.

    Telling three heads where each video token's cell was before gives every token
    what changed there (the temporal questions all hinge on it) from the first steps;
    unsupervised, a 3-layer LM finds it slowly or not at all.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = lm.layers[0].self_attn
        heads = lm.config.num_attention_heads
        if lm.config.num_key_value_heads != heads or heads < len(TEMPORAL_SETS):
            raise ValueError(f"TemporalCapture needs >= {len(TEMPORAL_SETS)} heads without "
                             f"grouped keys; got {heads} heads, "
                             f"{lm.config.num_key_value_heads} key heads")
        self._rope = apply_rotary_pos_emb
        self.active = False
        self.qk: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.handle = attn.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        """Detach the hook."""
        self.handle.remove()

    def __enter__(self):
        self.active, self.qk = True, None
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.active or self.qk is not None:  # only the first call: the prefix pass
            return
        h = kwargs["hidden_states"]
        b, s, _ = h.shape
        h_sets = len(TEMPORAL_SETS)
        q = module.q_proj(h).view(b, s, -1, module.head_dim).transpose(1, 2)[:, :h_sets]
        k = module.k_proj(h).view(b, s, -1, module.head_dim).transpose(1, 2)[:, :h_sets]
        cos, sin = kwargs["position_embeddings"]
        q, k = self._rope(q, k, cos, sin)
        self.qk = (q, k, module.scaling)

    def loss(self, kept: torch.Tensor, n_text: int) -> torch.Tensor:
        """Mean cross-entropy between each supervised head's attention row of every kept video
        token and the uniform distribution over its set (:func:`temporal_masks`).

        ``kept`` [B, L]: the video-token indices of the prefix pass, which started with
        ``n_text`` prompt tokens.
        """
        if self.qk is None:
            return torch.zeros(())
        q, k, scaling = self.qk
        length = kept.shape[1]
        qv = q[:, :, n_text:n_text + length].float()
        scores = torch.einsum("bhqd,bhkd->bhqk", qv, k.float()) * scaling
        pos = torch.arange(k.shape[2], device=k.device)
        visible = pos[None, :] <= (n_text + torch.arange(length, device=k.device))[:, None]
        # a finite fill: masked keys never carry target mass, and 0 * finite stays 0
        logp = scores.masked_fill(~visible, -1e4).log_softmax(-1)[..., n_text:n_text + length]
        sets = temporal_masks(kept.to(k.device)).float()
        count = sets.sum(-1)
        ce = -(sets * logp).sum(-1) / count.clamp(min=1)
        return ce[count > 0].mean()


@torch.no_grad()
def frame_features(model, frames_batch: Sequence[Sequence], batch: int = 4,
                   bf16: bool = False) -> torch.Tensor:
    """Pooled projected frame features [N, 8 * 144, D] (float16) of N clips, newline excluded.

    OneVision's video path (``get_video_features``) computed by hand so that the
    tower stops at the feature layer (the layers above it cannot change the
    selected hidden states); ``bf16``: under bf16 autocast.
    """
    from .build import pixel_values

    out = []
    dev = next(model.parameters()).device
    cfg = model.config
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    layer = cfg.vision_feature_layer
    n_layers = len(vm.encoder.layers)
    upto = layer if layer >= 0 else n_layers + 1 + layer  # hidden_states index
    for i in range(0, len(frames_batch), batch):
        pix = torch.stack([pixel_values(f) for f in frames_batch[i:i + batch]]).to(dev)
        b, t = pix.shape[:2]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            h = vm.pre_layrnorm(vm.embeddings(pix.flatten(0, 1).to(model.dtype)))
            for blk in vm.encoder.layers[:upto]:
                h = blk(h, None)
            if cfg.vision_feature_select_strategy == "default":
                h = h[:, 1:]
            feats = model.model.apply_pooling(model.model.multi_modal_projector(h))
        out.append(feats.reshape(b, -1, feats.shape[-1]).to(torch.float16).cpu())
    return torch.cat(out)


def make_clips(split: str, n: int, start: int = 0) -> list[Clip]:
    """Clips ``start .. start + n - 1`` of ``split``."""
    return [make_clip(split, i) for i in range(start, start + n)]


def feature_key(model, split: str, n: int, bf16: bool) -> str:
    """A digest of what the cached features of :func:`cache_clips` depend on: the frozen
    tower and projector weights, the clip and scene generators' source, the split, the
    count and the precision."""
    import hashlib
    import inspect

    from . import scenes

    h = hashlib.sha256(f"{split}:{n}:{bf16}:{model.config.vision_feature_layer}".encode())
    for mod in (model.model.vision_tower, model.model.multi_modal_projector):
        for name, t in sorted(mod.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    for src in (make_clip, scenes, frame_features):
        h.update(inspect.getsource(src).encode())
    return h.hexdigest()[:16]


def cache_clips(model, split: str, n: int, log: Log = print, chunk: int = 64,
                bf16: bool = False, store: Path | None = None):
    """Render ``n`` clips of ``split`` and cache their features; frames are dropped after.

    ``store``: a folder where the features are kept across runs under :func:`feature_key`
    (a hit skips the rendering and the tower; the clips' objects are laid out again).
    """
    path = None
    if store is not None:
        path = Path(store) / f"{split}-{n}-{feature_key(model, split, n, bf16)}.pt"
        if path.exists():
            log(f"features of {n} {split} clips from {path}")
            return ([make_clip(split, i, render=False) for i in range(n)],
                    torch.load(path, weights_only=True))
    feats, clips = [], []
    t0 = time.time()
    for i in range(0, n, chunk):
        part = make_clips(split, min(chunk, n - i), i)
        feats.append(frame_features(model, [c.frames for c in part], bf16=bf16))
        for c in part:
            c.frames = []
        clips.extend(part)
        if (i // chunk) % 10 == 0:
            log(f"cached {len(clips)}/{n} {split} clips t={time.time() - t0:.0f}s")
    out = torch.cat(feats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return clips, out


def _video_embeds(model, feats: torch.Tensor) -> torch.Tensor:
    nl = model.model.image_newline
    return torch.cat([feats.to(nl.dtype), nl[None, None].expand(len(feats), 1, -1)], 1)


def relevant_tokens(clip: Clip) -> np.ndarray:
    """[8 * 144] bool: every token, in every frame, of a cell any object covers in any frame
    (where things are, were or will be)."""
    masks = clip.token_masks().reshape(len(clip.objects), NUM_FRAMES, TOKENS_PER_FRAME)
    cells = masks.any((0, 1))
    return np.tile(cells, NUM_FRAMES)


def select_tokens(relevant: np.ndarray, rng: np.random.Generator, full: bool,
                  max_extra: float) -> np.ndarray:
    """Kept video-token indices [B, L] (ascending; the newline, index 1152, always kept).

    ``full``: all 1153. Otherwise every relevant token plus random others, up to
    ``max_extra`` of the rest (the same length for the whole batch).
    """
    b, n = relevant.shape
    if full:
        return np.tile(np.arange(n + 1), (b, 1))
    extra = int(rng.integers(0, int(max_extra * (n - relevant.sum(1).min())) + 1))
    length = min(n, int(relevant.sum(1).max()) + extra)
    rows = []
    for m in relevant:
        keep, other = np.flatnonzero(m), np.flatnonzero(~m)
        pick = rng.choice(other, length - len(keep), replace=False)
        rows.append(np.sort(np.concatenate([keep, pick, [n]])))
    return np.stack(rows)


def subset_answer_logits(model, codec: VideoCodec, video_embeds: torch.Tensor,
                         kept: torch.Tensor, suffixes: list, repeat: int = 1,
                         renumber: bool = False):
    """Like :func:`~tokensieve.zoo.lm_training.lm_answer_logits` for a subset of the video
    tokens that keep the RoPE positions they have in the full prompt (``renumber``:
    consecutive positions, the question right after the kept tokens, as ``ts.apply``
    feeds a pre-LLM reduction on OneVision).

    ``video_embeds`` [B, L, D] at video-token indices ``kept`` [B, L].
    """
    from .lm_training import _cache_name, _output_cache

    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    b = video_embeds.shape[0]
    dev = video_embeds.device
    p = len(codec.prefix)
    prefix = torch.cat([embed(torch.tensor(codec.prefix, device=dev))[None]
                        .expand(b, -1, -1).to(video_embeds.dtype), video_embeds], dim=1)
    length = kept.shape[1]
    pos = torch.cat([torch.arange(p, device=dev)[None].expand(b, -1),
                     p + (torch.arange(length, device=dev)[None].expand(b, -1) if renumber
                          else kept)], 1)
    cache = _output_cache(lm(inputs_embeds=prefix, position_ids=pos, use_cache=True))
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
    lens = [len(s) for s in suffixes]
    ids = torch.full((len(suffixes), max(lens)), codec.pad_id, dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, : len(s)] = torch.tensor(s)
    ids = ids.to(dev)
    start = p + (length if renumber else VIDEO_TOKENS)
    spos = (start + torch.arange(ids.shape[1], device=dev))[None].expand(len(ids), -1)
    out = lm(inputs_embeds=embed(ids), **{_cache_name(lm): cache}, position_ids=spos,
             use_cache=False)
    return model.lm_head(out.last_hidden_state), lens


def sample_rows(bank: list, idx: Sequence[int], k: int, rng: np.random.Generator,
                weights: dict[str, float] = FAMILY_WEIGHTS):
    """``k`` questions per clip (families drawn by ``weights`` among those defined)."""
    rows = []
    for i in idx:
        fams = sorted(bank[i])
        w = np.array([weights[f] for f in fams])
        picks = rng.choice(len(fams), size=k, p=w / w.sum())
        for p in picks:
            items = bank[i][fams[int(p)]]
            rows.append((i, items[int(rng.integers(0, len(items)))]))
    return rows


@torch.no_grad()
def quick_accuracy(model, codec: VideoCodec, feats: torch.Tensor, samples: list,
                   batch: int = 16) -> dict[str, float]:
    """Answer accuracy per family of ``samples`` ((clip index, question, answer, family))
    from cached features (the answer token's argmax after the prompt)."""
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        emb = _video_embeds(model, feats[[c for c, *_ in chunk]].float())
        sfx = [list(codec.suffix(q)) for _, q, _, _ in chunk]
        logits, lens = lm_answer_logits(model, codec, emb, sfx)
        pred = logits[torch.arange(len(chunk)), torch.tensor(lens) - 1].argmax(-1).tolist()
        for p, (_, _, a, f) in zip(pred, chunk, strict=True):
            hits.setdefault(f, []).append(p == codec.answer_id(a))
    acc = {f: float(np.mean(h)) for f, h in sorted(hits.items())}
    acc["overall"] = float(np.mean([x for h in hits.values() for x in h]))
    return acc


def train_video_lm(model, codec: VideoCodec, cfg: VideoTrainConfig, clips: Sequence[Clip],
                   bank: list, targets: list, feats: torch.Tensor, log: Log = print,
                   val: tuple[torch.Tensor, list] | None = None,
                   deadline: float = math.inf) -> int:
    """Train the LM (and ``image_newline``) on cached clip features; returns steps run.

    Stops early (cosine schedule unchanged) once ``time.time()`` passes ``deadline``.
    """
    lm = model.model.language_model
    dev = next(lm.parameters()).device
    relevant = np.stack([relevant_tokens(c) for c in clips])
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(lm.parameters()) + list(model.lm_head.parameters())
    if cfg.train_newline:
        params.append(model.model.image_newline)
    for p in params:
        p.requires_grad_(True)
    rng = np.random.default_rng((cfg.seed, 31))
    torch.manual_seed(cfg.seed + 3)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    capture = AttentionCapture(lm)
    temporal = TemporalCapture(lm)
    weights = cfg.family_weights()
    n, k = len(bank), cfg.questions_per_clip
    order, pos = rng.permutation(n), 0
    hits: dict[str, list[bool]] = {}
    t0 = time.time()
    step = 0
    lm.train()
    try:
        for step in range(cfg.steps):
            if time.time() > deadline:
                log(f"deadline reached after {step} steps")
                break
            if pos + cfg.batch > n:
                order, pos = rng.permutation(n), 0
            idx = [int(i) for i in order[pos:pos + cfg.batch]]
            pos += cfg.batch
            rows = sample_rows(bank, idx, k, rng, weights)
            full_step = rng.random() < cfg.full_prob
            sel_np = select_tokens(relevant[idx], rng, full_step, cfg.max_extra)
            renumber = not full_step and rng.random() < cfg.renumber_prob
            sel = torch.from_numpy(sel_np).to(dev)
            suffixes = [list(it.suffix) + [it.answer] for _, it in rows]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.steps, cfg.lr)
            with (torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16), capture,
                  temporal):
                emb = _video_embeds(model, feats[idx].to(dev).float())
                emb = torch.gather(emb, 1, sel[..., None].expand(-1, -1, emb.shape[-1]))
                logits, lens = subset_answer_logits(model, codec, emb, sel, suffixes, repeat=k,
                                                    renumber=renumber)
            r = torch.arange(len(rows), device=dev)
            apos = torch.tensor(lens, device=dev) - 2
            ans = torch.tensor([it.answer for _, it in rows], device=dev)
            ans_logits = logits[r, apos].float()
            loss = F.cross_entropy(ans_logits, ans) + 0.2 * F.cross_entropy(
                logits[r, apos + 1].float(), torch.full_like(ans, codec.eos_id))
            full = torch.from_numpy(np.stack([targets[i][it.target] for i, it in rows]))
            keep = torch.from_numpy(sel_np).repeat_interleave(k, 0)
            idx = keep.view(len(keep), *([1] * (full.dim() - 2)), -1)
            kept = torch.gather(full[..., 1:], -1, idx.expand(*full.shape[:-1], -1))
            tg = torch.cat([full[..., :1], kept], -1)
            attn_loss = capture.loss(tg, apos.cpu(), len(codec.prefix))
            time_loss = (temporal.loss(sel, len(codec.prefix)) if cfg.temporal_weight
                         else torch.zeros(()))
            total = loss + cfg.attn_weight * attn_loss + cfg.temporal_weight * time_loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for (_, it), ok in zip(rows, (ans_logits.argmax(-1) == ans).tolist(), strict=True):
                hits.setdefault(it.family, []).append(ok)
            if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
                accs = " ".join(f"{f[:5]}={np.mean(h):.2f}" for f, h in sorted(hits.items()))
                acc = np.mean([x for h in hits.values() for x in h])
                el = time.time() - t0
                log(f"step {step + 1} loss={loss.item():.3f} attn={attn_loss.item():.3f} "
                    f"time={time_loss.item():.3f} "
                    f"len={sel.shape[1]} "
                    f"acc={acc:.3f} [{accs}] t={el:.0f}s "
                    f"({(step + 1) * cfg.batch * k / el:.1f} q/s)")
                hits = {}
            if val is not None and (step + 1) % cfg.val_every == 0:
                lm.eval()
                acc = quick_accuracy(model, codec, *val)
                log("val " + " ".join(f"{f}={v:.3f}" for f, v in acc.items()))
                lm.train()
        else:
            step = cfg.steps
    finally:
        capture.remove()
        temporal.remove()
        lm.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return step


__all__ = [
    "CLIP_FAMILIES",
    "VideoCodec",
    "VideoTrainConfig",
    "build_bank",
    "cache_clips",
    "frame_features",
    "quick_accuracy",
    "train_video_lm",
]
