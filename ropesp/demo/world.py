"""The procedural toy world the demo model is trained on: squares and discs on a dark background.

Units: latent pixels (1 latent pixel = 8x8 video pixels) and latent frames (1 latent frame = 4 video
frames). A scene is up to three objects, each with a centre, a constant velocity, a size, a colour and
a shape; "moving" and "bouncing" objects reflect at the borders, "entering" and "leaving" ones fly
through them. The world is defined at latent resolution: its keyframes (one per latent frame) are uint8
images [F, h, w, 3]; its video is what the preview decoder makes of their latents (`render_video`), so
`ropesp.demo.latents.encode_video` recovers the latents exactly. The model is trained on overdriven
latents (`scene_latents(..., OVERDRIVE)`), whose keyframes decode to the same images.

Every prompt describes one canonical scene (`canonical_scene`: start positions and speeds chosen so that
objects never overlap and, for "moving", stay inside the first 9 latent frames); a seed only jitters it
a little (`scene_for`). So the prompt nearly determines the video, which is what lets a 4-step sampler
start the first chunk from pure noise without averaging over unrelated layouts (given a model that knows
where its tokens are: the demo preset's absolute position embedding, ModelConfig.pos_grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropesp.decode.preview import PreviewDecoder
from ropesp.demo.latents import rgb_to_latents, uint8_to_rgb

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
"""Object colours, uint8 RGB: saturated, so every channel sits at the decoder's clamp (see OVERDRIVE)."""
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
OVERDRIVE = 1.5
"""Contrast of the training latents about mid-grey: saturated channels land beyond the preview decoder's
clamp to [-1, 1], so keyframes decode to the same images, and a model's error of up to a third of the
range in them disappears in the decoded video."""
SHAPES = ("square", "disc")
MOTIONS = ("moving", "bouncing", "entering", "leaving")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
"""Unit vectors (x, y) in image coordinates (y grows downwards)."""
SIDES = {"left": "left", "right": "right", "top": "up", "bottom": "down"}
"""Border name -> the direction that points at it."""
MAX_OBJECTS = 3
GRID = 24
"""Latent grid (pixels a side) the canonical layouts are written for; other grids scale them."""
SIZE = {"square": 5.0, "disc": 5.5}
"""Side of a square / diameter of a disc, latent pixels on the canonical grid."""
POSITION_JITTER = 0.6
"""Half-width of the uniform jitter of every start coordinate, latent pixels."""
SPEED_JITTER = 0.05
"""Relative half-width of the uniform jitter of every velocity component."""
MAX_SPEED = 2.2
"""Fastest canonical velocity component, latent pixels per latent frame on the canonical grid."""


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for (ropesp.demo.prompts.parse makes one)."""

    count: int
    """Objects, 1..3."""
    colour: str
    """A key of COLOURS."""
    shape: str
    """'square' or 'disc'."""
    motion: str
    """'moving' | 'bouncing' | 'entering' | 'leaving'."""
    direction: str | None
    """Direction of travel (a key of DIRECTIONS); None for 'bouncing'."""

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"count={self.count} must be in 1..{MAX_OBJECTS}")
        if self.colour not in COLOURS or self.shape not in SHAPES or self.motion not in MOTIONS:
            raise ValueError(f"unknown colour/shape/motion in {self}")
        if (self.direction is None) != (self.motion == "bouncing"):
            raise ValueError(f"{self}: every motion but 'bouncing' needs a direction")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r}; choose one of {sorted(DIRECTIONS)}")

    @property
    def bounces(self) -> bool:
        """Whether the objects reflect at the borders (entering/leaving ones cross them)."""
        return self.motion in ("moving", "bouncing")


def all_specs() -> list[SceneSpec]:
    """Every scene the grammar can describe, in a fixed order (the training set's prompts)."""
    specs = []
    for count in range(1, MAX_OBJECTS + 1):
        for colour in COLOURS:
            for shape in SHAPES:
                for motion in MOTIONS:
                    for direction in [None] if motion == "bouncing" else list(DIRECTIONS):
                        specs.append(SceneSpec(count, colour, shape, motion, direction))
    return specs


@dataclass(frozen=True)
class Scene:
    """B scenes of up to MAX_OBJECTS objects as tensors (latent pixels, per latent frame)."""

    pos: torch.Tensor
    """[B, K, 2] float32 centres (x, y) at latent frame 0."""
    vel: torch.Tensor
    """[B, K, 2] float32 velocity, latent pixels per latent frame."""
    size: torch.Tensor
    """[B, K] float32 side / diameter."""
    disc: torch.Tensor
    """[B, K] bool: disc (else square)."""
    colour: torch.Tensor
    """[B, K, 3] float32 RGB in [0, 255]."""
    active: torch.Tensor
    """[B, K] bool: the object exists."""
    bounce: torch.Tensor
    """[B, K] bool: reflects at the borders."""
    height: int
    width: int


_BOUNCING = {
    1: [((6, 8), (2.2, 1.6))],
    2: [((6, 5), (2.2, -0.8)), ((18, 19), (-2.2, 0.8))],
    3: [((6, 3.5), (2.2, 0.0)), ((18, 12), (-2.2, 0.0)), ((10, 20.5), (2.2, 0.0))],
}
"""Canonical (centre, velocity) of bouncing objects on the 24-pixel grid."""
_LANES = {1: [12.0], 2: [7.5, 16.5], 3: [3.5, 12.0, 20.5]}
"""Cross-axis centres of objects that travel along one axis, on the 24-pixel grid."""
_ALONG = {"moving": (4.5, 1.5), "entering": (-5.5, 2.2), "leaving": (10.0, 2.2)}
"""(start along the direction of travel, speed) on the 24-pixel grid, for travel towards +x."""


def canonical_objects(spec: SceneSpec, height: int = GRID, width: int = GRID) -> list[tuple]:
    """[(x, y, vx, vy)] of the spec's objects before jitter, in latent pixels of an h x w grid."""
    sx, sy = width / GRID, height / GRID
    if spec.motion == "bouncing":
        return [(x * sx, y * sy, vx * sx, vy * sy) for (x, y), (vx, vy) in _BOUNCING[spec.count]]
    start, speed = _ALONG[spec.motion]
    dx, dy = DIRECTIONS[spec.direction]
    out = []
    for lane in _LANES[spec.count]:
        along = start if dx + dy > 0 else GRID - start  # travelling towards -x/-y starts at the far side
        if dx:
            out.append((along * sx, lane * sy, dx * speed * sx, 0.0))
        else:
            out.append((lane * sx, along * sy, 0.0, dy * speed * sy))
    return out


def object_size(shape: str, height: int = GRID, width: int = GRID) -> float:
    return SIZE[shape] * min(height, width) / GRID


def canonical_scene(specs: list[SceneSpec], height: int = GRID, width: int = GRID) -> Scene:
    """The canonical (unjittered) scenes of specs, one per spec, on the CPU."""
    b, k = len(specs), MAX_OBJECTS
    pos, vel = torch.zeros(b, k, 2), torch.zeros(b, k, 2)
    size, colour = torch.zeros(b, k), torch.zeros(b, k, 3)
    disc = torch.zeros(b, k, dtype=torch.bool)
    active = torch.zeros(b, k, dtype=torch.bool)
    bounce = torch.zeros(b, k, dtype=torch.bool)
    for i, spec in enumerate(specs):
        for j, (x, y, vx, vy) in enumerate(canonical_objects(spec, height, width)):
            pos[i, j] = torch.tensor([x, y])
            vel[i, j] = torch.tensor([vx, vy])
            size[i, j] = object_size(spec.shape, height, width)
            colour[i, j] = torch.tensor(COLOURS[spec.colour], dtype=torch.float32)
            disc[i, j] = spec.shape == "disc"
            active[i, j] = True
            bounce[i, j] = spec.bounces
    return Scene(pos, vel, size, disc, colour, active, bounce, height, width)


def take(scene: Scene, index: torch.Tensor) -> Scene:
    """Scenes scene[index] (index: [B] int64 on the scene's device)."""
    fields = {
        n: getattr(scene, n)[index] for n in ("pos", "vel", "size", "disc", "colour", "active", "bounce")
    }
    return Scene(**fields, height=scene.height, width=scene.width)


def to_device(scene: Scene, device: torch.device | str) -> Scene:
    fields = {
        n: getattr(scene, n).to(device) for n in ("pos", "vel", "size", "disc", "colour", "active", "bounce")
    }
    return Scene(**fields, height=scene.height, width=scene.width)


def jittered(scene: Scene, generator: torch.Generator | None = None) -> Scene:
    """The scenes with every start coordinate moved by up to POSITION_JITTER pixels and every velocity
    component scaled by up to 1 +- SPEED_JITTER (uniform draws from generator, on the scene's device)."""
    device = scene.pos.device
    shape = scene.pos.shape
    pos = scene.pos + POSITION_JITTER * (2 * torch.rand(shape, generator=generator, device=device) - 1)
    vel = scene.vel * (1 + SPEED_JITTER * (2 * torch.rand(shape, generator=generator, device=device) - 1))
    return Scene(
        pos, vel, scene.size, scene.disc, scene.colour, scene.active, scene.bounce, scene.height, scene.width
    )


def scene_for(
    specs: list[SceneSpec],
    generator: torch.Generator | None = None,
    height: int = GRID,
    width: int = GRID,
    jitter: bool = True,
) -> Scene:
    """The scenes of specs (one per spec), jittered by generator (CPU) unless jitter=False."""
    scene = canonical_scene(specs, height, width)
    return jittered(scene, generator) if jitter else scene


def seeded_scene(spec: SceneSpec, seed: int, height: int = GRID, width: int = GRID) -> Scene:
    """The one scene of spec for a seed (batch of 1): the world's seeded procedural video."""
    return scene_for([spec], torch.Generator("cpu").manual_seed(int(seed)), height, width)


def trajectories(scene: Scene, frames: int, start_frame: int = 0) -> torch.Tensor:
    """Centres [B, K, F, 2] at latent frames start_frame .. start_frame + frames - 1.

    Bouncing objects move on a triangle wave between the walls (centre in [size/2, extent - size/2])."""
    t = torch.arange(start_frame, start_frame + frames, dtype=torch.float32, device=scene.pos.device)
    return centres_at(scene, t.expand(scene.pos.shape[0], frames))


def centres_at(scene: Scene, times: torch.Tensor) -> torch.Tensor:
    """Centres [B, K, F, 2] at latent frames times [B, F] (each scene its own frames, e.g. a sink and a
    window far into a stream)."""
    t = times.to(torch.float32)
    p = scene.pos[:, :, None, :] + scene.vel[:, :, None, :] * t[:, None, :, None]  # [B, K, F, 2]
    extent = torch.tensor([scene.width, scene.height], dtype=torch.float32, device=p.device)
    lo = scene.size[:, :, None, None] / 2
    span = (extent - 2 * lo).clamp_min(1e-6)  # [B, K, 1, 2]
    u = torch.remainder(p - lo, 2 * span)
    reflected = lo + torch.where(u <= span, u, 2 * span - u)
    return torch.where(scene.bounce[:, :, None, None], reflected, p)


def render(scene: Scene, frames: int, start_frame: int = 0) -> torch.Tensor:
    """Keyframes [B, F, h, w, 3] uint8: the objects (area-coverage anti-aliased, later ones in front)
    over the background, one image per latent frame."""
    return render_centres(scene, trajectories(scene, frames, start_frame))


def render_centres(scene: Scene, centres: torch.Tensor) -> torch.Tensor:
    """Keyframes [B, F, h, w, 3] uint8 of the scenes' objects at centres [B, K, F, 2] (`render`)."""
    frames = centres.shape[2]
    device = centres.device
    xs = torch.arange(scene.width, dtype=torch.float32, device=device) + 0.5
    ys = torch.arange(scene.height, dtype=torch.float32, device=device) + 0.5
    dx = xs[None, None, None, None, :] - centres[..., 0, None, None]  # [B, K, F, 1, w]
    dy = ys[None, None, None, :, None] - centres[..., 1, None, None]  # [B, K, F, h, 1]
    half = scene.size[:, :, None, None, None] / 2
    square = (half - dx.abs() + 0.5).clamp(0, 1) * (half - dy.abs() + 0.5).clamp(0, 1)
    disc = (half - torch.sqrt(dx * dx + dy * dy) + 0.5).clamp(0, 1)
    alpha = torch.where(scene.disc[:, :, None, None, None], disc, square)  # [B, K, F, h, w]
    alpha = alpha * scene.active[:, :, None, None, None]
    b = centres.shape[0]
    img = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).expand(
        b, frames, scene.height, scene.width, 3
    )
    for k in range(scene.pos.shape[1]):
        a = alpha[:, k, ..., None]  # [B, F, h, w, 1]
        img = img * (1 - a) + a * scene.colour[:, k, None, None, None, :]
    return img.round().clamp(0, 255).to(torch.uint8)


def scene_latents(scene: Scene, frames: int, overdrive: float = 1.0) -> torch.Tensor:
    """Latents [B, F, 16, h, w] float32 of the scenes' keyframes: their least-squares encoding, with the
    contrast about mid-grey scaled by overdrive (OVERDRIVE for training targets; the keyframes decode the
    same, since saturated channels only move further past the decoder's clamp)."""
    return rgb_to_latents(overdrive * uint8_to_rgb(render(scene, frames)))


def latents_at(scene: Scene, times: torch.Tensor, overdrive: float = 1.0) -> torch.Tensor:
    """Latents [B, F, 16, h, w] float32 of each scene at its own latent frames times [B, F] (as
    `scene_latents`)."""
    return rgb_to_latents(overdrive * uint8_to_rgb(render_centres(scene, centres_at(scene, times))))


def render_video(scene: Scene, frames: int) -> torch.Tensor:
    """The world's videos [B, 4F - 3, 8h, 8w, 3] uint8: the preview decoder's output for the keyframes."""
    return PreviewDecoder().decode(scene_latents(scene, frames))


def visible_extent(centre: float, half: float, extent: float) -> float:
    """How far (latent pixels) an object of half-size `half` centred at `centre` reaches into [0, extent]
    along one axis; negative: the gap between its near edge and the border."""
    lo, hi = centre - half, centre + half
    if hi <= 0:
        return hi
    if lo >= extent:
        return extent - lo
    return min(hi, extent) - max(lo, 0.0)


def expected_visible(spec: SceneSpec, frames: int, height: int = GRID, width: int = GRID) -> list[int | None]:
    """Per latent frame, how many objects the canonical scene shows for certain despite the jitter:
    the count, 0, or None where an object is partly across a border (not scored)."""
    scene = scene_for([spec], height=height, width=width, jitter=False)
    centres = trajectories(scene, frames)[0]  # [K, F, 2]
    half = object_size(spec.shape, height, width) / 2
    # worst-case drift of a jittered object from the canonical one, plus half a pixel of anti-aliasing
    margin = POSITION_JITTER + SPEED_JITTER * MAX_SPEED * frames * max(height, width) / GRID + 0.5
    out: list[int | None] = []
    for f in range(frames):
        shown, unsure = 0, False
        for k in range(spec.count):
            x, y = (float(v) for v in centres[k, f])
            reach = min(visible_extent(x, half, width), visible_extent(y, half, height))
            if reach >= half + margin:
                shown += 1
            elif reach > -margin:
                unsure = True
        out.append(None if unsure else shown)
    return out
