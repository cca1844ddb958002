"""Quality metric of demo videos: does the decoded video show what the prompt says? (No model needed.)

The latents are decoded with the preview decoder; each latent frame's video frame (0, 4, 8, ...) is read at
latent resolution (the mean of each 8x8 block) and every pixel is labelled background, one of the world's
colours, or junk: a pixel p belongs to colour c when, seen as a mix bg + a*(c - bg), its coverage a is at
least 0.5 and it lies within RESIDUAL levels of that line (so anti-aliased edges count, other hues do not).
Objects are the 4-connected components of the prompt's colour of at least MIN_AREA pixels.

Per video (each part in [0, 1], 1 = as the prompt says):
- presence: the fraction of scored frames (world.expected_visible: every frame, except those where an
  entering/leaving object is partly across a border) with exactly the expected number of objects of the
  prompt's colour, every one clear of the borders of the prompt's shape (the nearer of a square and a
  disc template drawn at its centre), no object of another colour and less than 5% junk pixels;
- motion: the fraction of consecutive frame pairs, both with all objects present, whose objects move as
  the prompt says: the centroid of the colour's pixels steps >= MIN_STEP along the direction and less
  across it for moving/entering/leaving; for bouncing the objects move >= MIN_STEP a frame on average
  (one that turns at a wall may barely move);
- steadiness (no flicker): the fraction of consecutive frame pairs (chunk boundaries included) in which
  the colour's pixel mass changes by less than 35% (unless an object crosses a border) and the mean
  level of the pixels outside objects changes by less than 6 levels.
score = presence * motion * steadiness. The world's own videos score ~1; noise (an untrained model) ~0.
The score is defined for the 9-latent-frame videos the canonical scenes are made for: over longer ones a
"moving" object bounces back and an entering one leaves again, which the prompt does not describe (the
world's own 30-frame videos score 0); scripts/demo_long_stream.py looks at long streams instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropesp.config import VAE_STRIDE
from ropesp.decode.preview import PreviewDecoder
from ropesp.demo.world import BACKGROUND, COLOURS, DIRECTIONS, SceneSpec, expected_visible, object_size

RESIDUAL = 40.0
"""Largest distance (levels) of a pixel from a colour's background-to-colour line."""
BACKGROUND_RADIUS = 24.0
"""Pixels within this distance (levels) of the background colour are background."""
MIN_AREA = 4
"""Smallest component (latent pixels) counted as an object."""
MIN_STEP = 0.4
"""Smallest motion (latent pixels per latent frame) that counts as moving."""
JUNK_FRACTION = 0.05
MASS_CHANGE = 0.35
BACKGROUND_CHANGE = 6.0


@dataclass(frozen=True)
class VideoScore:
    presence: float
    motion: float
    steadiness: float

    @property
    def score(self) -> float:
        return self.presence * self.motion * self.steadiness


def keyframes(latents: torch.Tensor) -> torch.Tensor:
    """latents [1, F, 16, h, w] (or [F, 16, h, w]) -> the decoded video's keyframes at latent resolution,
    [F, h, w, 3] float64 levels in [0, 255] (from the preview decoder's uint8 frames)."""
    if latents.dim() == 4:
        latents = latents.unsqueeze(0)
    video = PreviewDecoder().decode(latents.float().cpu())[0]  # [N, H, W, 3] uint8
    key = video[:: VAE_STRIDE[0]]
    f, height, width, _ = key.shape
    s = VAE_STRIDE[1]
    return key.view(f, height // s, s, width // s, s, 3).double().mean(dim=(2, 4))


EDGE = -2
JUNK = -1


def label_pixels(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, h, w, 3] levels -> (labels [F, h, w] int64: 0 background, 1+i colour i of COLOURS, EDGE (a
    colour's anti-aliased rim: coverage < 0.5), JUNK (near no colour's line); coverage [F, h, w] float64
    of the labelled colour, 0 on background and junk)."""
    bg = torch.tensor(BACKGROUND, dtype=torch.float64)
    cols = torch.tensor(list(COLOURS.values()), dtype=torch.float64) - bg  # [K, 3]
    d = frames - bg  # [F, h, w, 3]
    a = torch.einsum("fhwc,kc->fhwk", d, cols) / (cols * cols).sum(-1)  # coverage along each colour
    resid = (d[..., None, :] - a[..., None] * cols).norm(dim=-1)  # [F, h, w, K]
    resid = torch.where(a >= 0.15, resid, torch.inf)
    best, idx = resid.min(dim=-1)
    cover = a.gather(-1, idx[..., None])[..., 0]
    fits = best <= RESIDUAL
    labels = torch.where(cover >= 0.5, idx + 1, torch.full_like(idx, EDGE))
    labels = torch.where(fits, labels, torch.full_like(idx, JUNK))
    labels = torch.where(d.norm(dim=-1) <= BACKGROUND_RADIUS, torch.zeros_like(labels), labels)
    cover = torch.where((labels > 0) | (labels == EDGE), cover.clamp(0, 1), torch.zeros_like(cover))
    return labels, cover


def components(mask: torch.Tensor) -> list[torch.Tensor]:
    """4-connected components of a [h, w] bool mask, each as [n, 2] (row, col) int64 pixels."""
    h, w = mask.shape
    out = []
    m = mask.tolist()
    visited = [[False] * w for _ in range(h)]
    for r0 in range(h):
        for c0 in range(w):
            if not m[r0][c0] or visited[r0][c0]:
                continue
            stack, pix = [(r0, c0)], []
            visited[r0][c0] = True
            while stack:
                r, c = stack.pop()
                pix.append((r, c))
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < h and 0 <= cc < w and m[rr][cc] and not visited[rr][cc]:
                        visited[rr][cc] = True
                        stack.append((rr, cc))
            out.append(torch.tensor(pix, dtype=torch.int64))
    return out


@dataclass(frozen=True)
class FrameObjects:
    centres: list[tuple[float, float]]
    """(x, y) of each object of the prompt's colour."""
    shapes: list[str | None]
    """'square' or 'disc' by the nearer template (None when it touches the border)."""
    others: int
    """Objects of other colours."""
    junk: float
    """Fraction of junk pixels."""
    mass: int
    """Pixels of the prompt's colour."""
    centroid: tuple[float, float] | None
    background: float
    """Mean level of the pixels that belong to no object (background, rims, junk)."""


def classify_shape(cover: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> str | None:
    """'square' or 'disc': which of the world's two shapes, drawn at the component's centre, is nearer
    (squared error) to the coverage around it; None when the object touches the border."""
    h, w = cover.shape
    r0, r1, c0, c1 = int(rows.min()) - 1, int(rows.max()) + 1, int(cols.min()) - 1, int(cols.max()) + 1
    if r0 < 0 or c0 < 0 or r1 >= h or c1 >= w:
        return None
    win = cover[r0 : r1 + 1, c0 : c1 + 1]
    ys = torch.arange(r0, r1 + 1, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(c0, c1 + 1, dtype=torch.float64)[None, :] + 0.5
    mass = win.sum()
    cx, cy = float((win * xs).sum() / mass), float((win * ys).sum() / mass)
    dx, dy = xs - cx, ys - cy
    errors = {}
    for shape in ("square", "disc"):
        half = object_size(shape, h, w) / 2
        if shape == "square":
            t = (half - dx.abs() + 0.5).clamp(0, 1) * (half - dy.abs() + 0.5).clamp(0, 1)
        else:
            t = (half - torch.sqrt(dx * dx + dy * dy) + 0.5).clamp(0, 1)
        errors[shape] = float((win - t).pow(2).sum())
    return min(errors, key=errors.get)


def find_objects(frame: torch.Tensor, labels: torch.Tensor, cover: torch.Tensor, colour: str) -> FrameObjects:
    """The objects of `colour` in one keyframe ([h, w, 3] levels, [h, w] labels and coverage)."""
    target = list(COLOURS).index(colour) + 1
    centres, shapes = [], []
    for comp in components(labels == target):
        if len(comp) < MIN_AREA:
            continue
        rows, cols = comp[:, 0], comp[:, 1]
        centres.append((float(cols.double().mean()) + 0.5, float(rows.double().mean()) + 0.5))
        own = torch.where((labels == target) | (labels == EDGE), cover, torch.zeros_like(cover))
        shapes.append(classify_shape(own, rows, cols))
    others = 0
    for k in range(1, len(COLOURS) + 1):
        if k != target:
            others += sum(len(c) >= MIN_AREA for c in components(labels == k))
    mask = labels == target
    ys, xs = torch.nonzero(mask, as_tuple=True)
    centroid = (float(xs.double().mean()) + 0.5, float(ys.double().mean()) + 0.5) if len(xs) else None
    rest = labels <= 0  # background, rims and junk: what is not an object
    background = float(frame[rest].mean()) if rest.any() else 0.0
    return FrameObjects(
        centres,
        shapes,
        others,
        float((labels == JUNK).double().mean()),
        int(mask.sum()),
        centroid,
        background,
    )


def score_latents(latents: torch.Tensor, spec: SceneSpec) -> VideoScore:
    """Score one video's latents [1, F, 16, h, w] against the scene its prompt describes."""
    frames = keyframes(latents)
    labels, cover = label_pixels(frames)
    f, h, w, _ = frames.shape
    objs = [find_objects(frames[i], labels[i], cover[i], spec.colour) for i in range(f)]
    expected = expected_visible(spec, f, h, w)

    def frame_ok(i: int) -> bool:
        o = objs[i]
        if len(o.centres) != expected[i] or o.others or o.junk >= JUNK_FRACTION:
            return False
        return all(shape in (None, spec.shape) for shape in o.shapes)

    scored = [i for i in range(f) if expected[i] is not None]
    presence = sum(frame_ok(i) for i in scored) / max(len(scored), 1)
    full = [i for i in range(f) if expected[i] == spec.count and len(objs[i].centres) == spec.count]
    pairs = [(i, i + 1) for i in full if i + 1 in full]
    motion_ok = []
    for i, j in pairs:
        if spec.direction is not None:
            (x0, y0), (x1, y1) = objs[i].centroid, objs[j].centroid
            ux, uy = DIRECTIONS[spec.direction]
            along = (x1 - x0) * ux + (y1 - y0) * uy
            across = abs((x1 - x0) * uy - (y1 - y0) * ux)
            motion_ok.append(along >= MIN_STEP and across < max(along, 1.0))
        else:
            steps = [min(_dist(a, b) for b in objs[j].centres) for a in objs[i].centres]
            motion_ok.append(sum(steps) / len(steps) >= MIN_STEP)
    motion = sum(motion_ok) / len(motion_ok) if motion_ok else 0.0
    steady = []
    for i in range(f - 1):
        a, b = objs[i], objs[i + 1]
        crossing = expected[i] != spec.count or expected[i + 1] != spec.count
        mass_ok = crossing or abs(a.mass - b.mass) <= MASS_CHANGE * max(a.mass, b.mass, 1)
        steady.append(mass_ok and abs(a.background - b.background) < BACKGROUND_CHANGE)
    steadiness = sum(steady) / len(steady) if steady else 1.0
    return VideoScore(presence, motion, steadiness)


def _dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5
