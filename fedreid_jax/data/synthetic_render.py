"""Procedural pedestrian renderer for the synthetic re-ID benchmark (numpy + PIL).

Three levels of randomness, each a frozen dataclass sampled from a
`np.random.Generator`:

- `Identity` (who): clothing colours and pattern, body proportions, skin and
  hair, accessories (shoulder bag on one side, hat, backpack).
- `Camera` (where): background scene, illumination and colour cast, preferred
  viewpoints, person scale/position, blur and noise, occluders.
- per image (when): viewpoint, walking pose, position/scale/light jitter.

A person is painted with soft-edged shapes (signed distances) onto a float
canvas twice the output size, then downsampled with Lanczos antialiasing; the
camera's blur and sensor noise are applied at the output size. Views are
front, back, side facing image-left and side facing image-right: they move the
bag to the other image side or hide it, show the backpack or only its straps,
show the face or only hair, and hide the front logo on the back.
"""
from __future__ import annotations

import colorsys
import dataclasses
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

Color = tuple[float, float, float]
VIEWS = ("front", "back", "left", "right")
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "twotone", "logo", "diagonal", "jacket")
BOTTOMS = ("trousers", "shorts", "skirt")
BACKGROUNDS = ("flat", "gradient", "floor", "texture", "panels")


@dataclasses.dataclass(frozen=True)
class DomainStyle:
  """A domain's global look (all dimensionless; 1.0 / 0.0 = neutral)."""
  hue_center: float = 0.6      # preferred clothing hue in [0, 1)
  hue_focus: float = 0.2       # probability a garment colour is drawn near it
  saturation: float = 1.0      # clothing saturation scale
  brightness: float = 1.0      # clothing value scale
  neutral_prob: float = 0.3    # probability of a black/grey/white garment
  contrast: float = 1.0        # global contrast
  cast: float = 0.1            # std of per-camera log colour cast
  light: tuple[float, float] = (0.6, 1.3)  # camera illumination gain range
  blur: float = 0.6            # max blur sigma (output pixels)
  noise: float = 0.03          # max sensor noise std (in [0, 1] units)
  jitter: float = 0.05         # detector misalignment (fraction of width/height)
  view_bias: float = 0.6       # how strongly each camera prefers one viewpoint
  occlusion: float = 0.1       # max per-camera occluder probability
  indoor: float = 0.5          # probability a camera scene is indoor
  bg_hue: float = 0.1          # preferred background hue
  bg_saturation: float = 0.25  # background saturation scale


@dataclasses.dataclass(frozen=True)
class Identity:
  """One person's appearance. Colours are RGB in [0, 1]."""
  top: Color
  top2: Color
  pattern: str
  freq: float
  short_sleeves: bool
  bottom: Color
  bottom_type: str
  shoes: Color
  skin: Color
  hair: Color
  long_hair: bool
  height: float       # fraction of the camera's person height
  width: float        # body width factor
  head: float         # head size factor
  leg: float          # leg length as a fraction of height
  hat: Color | None
  bag: Color | None
  bag_side: int       # +1 person's right, -1 left
  backpack: Color | None


@dataclasses.dataclass(frozen=True, eq=False)
class Camera:
  """One camera's conditions. `background` is `[H2 + pad, W2 + pad, 3]` float."""
  background: np.ndarray
  pad: int
  gain: float
  cast: np.ndarray          # [3] channel multipliers
  gamma: float
  contrast: float
  slope: float              # horizontal illumination gradient
  view_probs: np.ndarray    # [4] over VIEWS
  scale: float              # mean person height / image height
  x_offset: float           # mean horizontal offset (fraction of width)
  jitter: float             # per-image position jitter (fraction of width/height)
  blur: float
  noise: float
  occlusion: float
  occluder: Color


def hsv(h: float, s: float, v: float) -> Color:
  r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
  return (r, g, b)


def garment_color(rng: np.random.Generator, style: DomainStyle) -> Color:
  """A clothing colour biased by the domain palette."""
  if rng.random() < style.neutral_prob:
    v = rng.choice([0.07, 0.18, 0.32, 0.5, 0.7, 0.9]) + rng.normal(0, 0.03)
    return hsv(rng.random(), rng.uniform(0, 0.12), v * min(1.0, style.brightness + 0.15))
  h = style.hue_center + rng.normal(0, 0.05) if rng.random() < style.hue_focus else rng.random()
  return hsv(h, rng.uniform(0.4, 1.0) * style.saturation, rng.uniform(0.35, 1.0) * style.brightness)


def sample_identity(rng: np.random.Generator, style: DomainStyle) -> Identity:
  top, bottom = garment_color(rng, style), garment_color(rng, style)
  skin_v = rng.uniform(0.35, 0.95)
  return Identity(
      top=top, top2=garment_color(rng, style),
      pattern=str(rng.choice(PATTERNS, p=[0.3, 0.12, 0.08, 0.1, 0.1, 0.12, 0.06, 0.12])),
      freq=float(rng.uniform(2.5, 5.5)), short_sleeves=bool(rng.random() < 0.35),
      bottom=bottom, bottom_type=str(rng.choice(BOTTOMS, p=[0.65, 0.2, 0.15])),
      shoes=hsv(rng.random(), rng.uniform(0, 0.4), rng.choice([0.1, 0.25, 0.85])),
      skin=hsv(rng.uniform(0.03, 0.09), rng.uniform(0.25, 0.55), skin_v),
      hair=hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.7), rng.choice([0.08, 0.2, 0.4, 0.75])),
      long_hair=bool(rng.random() < 0.35),
      height=float(rng.uniform(0.88, 1.0)), width=float(rng.uniform(0.8, 1.25)),
      head=float(rng.uniform(0.85, 1.2)), leg=float(rng.uniform(0.42, 0.52)),
      hat=garment_color(rng, style) if rng.random() < 0.15 else None,
      bag=garment_color(rng, style) if rng.random() < 0.35 else None,
      bag_side=int(rng.choice([-1, 1])),
      backpack=garment_color(rng, style) if rng.random() < 0.3 else None)


def _upsample_noise(rng: np.random.Generator, h: int, w: int, gh: int, gw: int) -> np.ndarray:
  """Smooth random field `[h, w]` in [0, 1] from a `[gh, gw]` grid (bicubic)."""
  grid = (rng.random((gh, gw)) * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC),
                    np.float32) / 255.0


def render_background(rng: np.random.Generator, style: DomainStyle, h: int, w: int) -> np.ndarray:
  """A static camera scene `[h, w, 3]` float in [0, 1]."""
  indoor = rng.random() < style.indoor
  def col(v_lo, v_hi):
    hue = style.bg_hue + rng.normal(0, 0.08) if rng.random() < 0.6 else rng.random()
    return np.array(hsv(hue, rng.uniform(0.05, 0.6) * style.bg_saturation * 2,
                        rng.uniform(v_lo, v_hi)), np.float32)
  c1 = col(0.35, 0.8)
  c2, c3 = (0.6 * c1 + 0.4 * col(0.25, 0.8) for _ in range(2))  # muted scene contrast
  y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
  x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
  kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  horizon = rng.uniform(0.45, 0.8) if indoor else rng.uniform(0.3, 0.65)
  floor = y > horizon
  if kind == "flat":
    bg = c1 * (1 - 0.2 * y) + 0 * x
  elif kind == "gradient":
    t = x if rng.random() < 0.4 else y
    bg = c1 * (1 - t) + c2 * t
  elif kind == "floor":
    tiles = (np.floor((y - horizon) / np.maximum(y - horizon + 0.05, 1e-3) * 6) % 2)
    bg = np.where(floor, c2 * (0.85 + 0.15 * tiles), c1 + 0 * x)
  elif kind == "texture":
    t = _upsample_noise(rng, h, w, int(rng.integers(3, 8)), int(rng.integers(2, 5)))[..., None]
    bg = c1 * (1 - t) + c2 * t
  else:  # panels: shop fronts / windows above a floor
    edges = np.sort(rng.random(int(rng.integers(2, 5))))
    band = (np.searchsorted(edges, x[0, :, 0]) % 2).astype(np.float32)[None, :, None]
    bg = np.where(floor, c3 + 0 * x, c1 * (1 - band) + c2 * band)
  for _ in range(int(rng.integers(0, 3))):  # static scene objects: poles, signs
    ox, ow = rng.uniform(0, 1), rng.uniform(0.03, 0.25)
    oy0 = rng.uniform(0, 0.6)
    oy1 = oy0 + rng.uniform(0.08, 0.5) if rng.random() < 0.6 else 1.0
    m = (np.abs(x - ox) < ow / 2) & (y > oy0) & (y < oy1)
    bg = np.where(m, 0.4 * c1 + 0.6 * col(0.05, 1.0), bg)
  grain = _upsample_noise(rng, h, w, h // 4, w // 4)[..., None] - 0.5
  bg = bg * (1 + rng.uniform(0.03, 0.15) * grain)
  return np.clip(np.broadcast_to(bg, (h, w, 3)), 0, 1).astype(np.float32)


def sample_camera(rng: np.random.Generator, style: DomainStyle, canvas: tuple[int, int],
                  main_view: int | None = None) -> Camera:
  """A camera with its scene prerendered at canvas size `(H2, W2)` plus padding.

  `main_view` (index into VIEWS; 2 or 3 = side) is the viewpoint the camera
  prefers with weight `style.view_bias` (random if None); a side camera sees
  both walking directions. Scalar conditions are drawn first, the scene last,
  so only the scene's fine texture depends on the canvas size.
  """
  h2, w2 = canvas
  pad = max(2, int(round(style.jitter * w2)))
  main = int(rng.integers(4)) if main_view is None else int(main_view)
  probs = np.full(4, (1 - style.view_bias) / 4)
  if main >= 2:
    probs[2:] += style.view_bias / 2
  else:
    probs[main] += style.view_bias
  cast = np.exp(np.clip(rng.normal(0, style.cast, 3), -2 * style.cast, 2 * style.cast))
  params = dict(
      gain=float(rng.uniform(*style.light)), cast=(cast / cast.mean()).astype(np.float32),
      gamma=float(np.exp(rng.normal(0, 0.2))), contrast=float(style.contrast * rng.uniform(0.75, 1.15)),
      slope=float(rng.uniform(-0.4, 0.4)), view_probs=probs / probs.sum(),
      scale=float(rng.uniform(0.8, 0.95)), x_offset=float(rng.uniform(-0.08, 0.08)),
      jitter=float(style.jitter), blur=float(rng.uniform(0, style.blur)),
      noise=float(rng.uniform(0.005, style.noise)), occlusion=float(rng.uniform(0, style.occlusion)),
      occluder=hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.1, 0.8)))
  return Camera(background=render_background(rng, style, h2 + pad, w2 + pad), pad=pad, **params)


# ---------------------------------------------------------------- painting


class Band(NamedTuple):
  """A soft mask `[r, W]` in [0, 1] covering canvas rows `r0 .. r0 + r`."""
  r0: int
  m: np.ndarray


class _Canvas:
  """A float RGB canvas `[H, W, 3]`; shapes are evaluated only on the rows they span."""

  def __init__(self, image: np.ndarray):
    self.img = image
    self.h, w = image.shape[:2]
    self.y = np.arange(self.h, dtype=np.float32)[:, None] + 0.5
    self.x = np.arange(w, dtype=np.float32)[None, :] + 0.5

  def rows(self, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """First row index and pixel-centre y `[r, 1]` of rows touching `[lo, hi]`."""
    r0 = int(np.clip(np.floor(lo) - 1, 0, self.h))
    r1 = int(np.clip(np.ceil(hi) + 1, r0, self.h))
    return r0, self.y[r0:r1]

  def ys(self, band: Band) -> np.ndarray:
    return self.y[band.r0:band.r0 + band.m.shape[0]]

  def paint(self, band: Band, color) -> None:
    """Alpha-blends `color` (`[3]`, or `[r, W, 3]` on the band's rows) in place."""
    if band.m.size:
      img = self.img[band.r0:band.r0 + band.m.shape[0]]
      img += band.m[..., None] * (np.asarray(color, np.float32) - img)

  def rect(self, cx, cy, hw, hh) -> Band:
    r0, y = self.rows(cy - hh, cy + hh)
    d = np.maximum(np.abs(self.x - cx) - hw, np.abs(y - cy) - hh)
    return Band(r0, np.clip(0.5 - d, 0, 1))

  def ellipse(self, cx, cy, rx, ry) -> Band:
    r0, y = self.rows(cy - ry, cy + ry)
    r = np.sqrt(((self.x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return Band(r0, np.clip((1 - r) * min(rx, ry) + 0.5, 0, 1))

  def capsule(self, a, b, radius) -> Band:
    """A limb: the segment `a -> b` thickened by `radius`."""
    (ax, ay), (bx, by) = a, b
    r0, y = self.rows(min(ay, by) - radius, max(ay, by) + radius)
    dx, dy = bx - ax, by - ay
    t = np.clip(((self.x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    d = np.sqrt((self.x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2) - radius
    return Band(r0, np.clip(0.5 - d, 0, 1))

  def trapezoid(self, cx, y0, y1, hw0, hw1) -> tuple[Band, np.ndarray, np.ndarray]:
    """Mask and local coords `(u in [-1, 1], v in [0, 1])` of a vertical trapezoid."""
    r0, y = self.rows(y0, y1)
    v = (y - y0) / (y1 - y0)
    hw = hw0 + (hw1 - hw0) * np.clip(v, 0, 1)
    u = (self.x - cx) / hw
    d = np.maximum(np.abs(self.x - cx) - hw, np.maximum(y0 - y, y - y1))
    return Band(r0, np.clip(0.5 - d, 0, 1)), u, v


def _pattern_color(ident: Identity, u, v, view: str) -> np.ndarray:
  """Torso colour field `[r, W, 3]` on the torso band (logo/jacket front only)."""
  f, p = ident.freq, ident.pattern
  frac = lambda t: t - np.floor(t)
  if p == "hstripes":
    sel = frac(v * f) < 0.5
  elif p == "vstripes":
    sel = frac((u + 1) * 0.35 * f) < 0.5
  elif p == "checks":
    sel = (frac(v * f) < 0.5) ^ (frac((u + 1) * 0.35 * f) < 0.5)
  elif p == "twotone":
    sel = v < 0.42 + 0 * u
  elif p == "diagonal":
    sel = frac((v + 0.5 * u) * f) < 0.5
  elif p == "logo" and view == "front":
    sel = (np.abs(u) < 0.38) & (np.abs(v - 0.4) < 0.15)
  elif p == "jacket" and view == "front":
    sel = np.abs(u) < 0.22 + 0 * v
  else:
    sel = np.zeros_like(u * v, bool)
  shade = (1 - 0.22 * np.clip(u, -1, 1) ** 2)[..., None]
  return np.where(sel[..., None], np.asarray(ident.top2, np.float32),
                  np.asarray(ident.top, np.float32)) * shade


def paint_person(cv: _Canvas, ident: Identity, view: str, cx: float, top: float,
                 height: float, rng: np.random.Generator) -> None:
  """Paints one pedestrian of `height` px, head top at `top`, centred at `cx`."""
  P, W = height, ident.width
  side = view in ("left", "right")
  f = {"left": -1.0, "right": 1.0}.get(view, 0.0)          # facing direction
  hr = 0.065 * P * ident.head                               # head radius (vertical)
  hy = top + hr
  sh_y = top + 2 * hr + 0.02 * P                            # shoulders
  foot = top + P
  hip = foot - ident.leg * P
  sw = 0.15 * P * W * (0.65 if side else 1.0)               # shoulder half width
  ww = 0.13 * P * W * (0.65 if side else 1.0)               # waist half width
  lw = 0.055 * P * W ** 0.5                                 # limb radius
  aw = 0.045 * P * W ** 0.5
  stride = rng.uniform(0, 0.14) * P if side else 0.0
  spread = rng.uniform(0, 0.03) * P
  swing = rng.uniform(-0.08, 0.08) * P if side else 0.0
  knee = hip + 0.45 * (foot - hip)
  dark = lambda c, k=0.78: tuple(k * np.asarray(c))

  # Legs (far leg darker in side views), shorts/skirt, shoes.
  if side:
    legs = [((cx, hip), (cx - f * stride / 2, foot), 0.8), ((cx, hip), (cx + f * stride / 2, foot), 1.0)]
  else:
    hx = 0.065 * P * W
    legs = [((cx - hx, hip), (cx - hx - spread, foot), 1.0), ((cx + hx, hip), (cx + hx + spread, foot), 1.0)]
  if ident.long_hair and view == "front":
    cv.paint(cv.rect(cx, (hy + sh_y) / 2 + 0.05 * P, hr * 0.95, (sh_y - hy) / 2 + 0.05 * P), ident.hair)
  if side and ident.backpack is not None:
    cv.paint(cv.rect(cx - f * (sw + 0.045 * P), (sh_y + hip) / 2 - 0.02 * P, 0.05 * P,
                     (hip - sh_y) / 2 - 0.03 * P), ident.backpack)
  if side:  # far arm behind the body
    cv.paint(cv.capsule((cx, sh_y + aw), (cx - swing, hip + 0.02 * P), aw), dark(ident.top))
  for a, b, k in legs:
    lower = ident.skin if ident.bottom_type != "trousers" else ident.bottom
    cv.paint(cv.capsule(a, b, lw), dark(lower, k))
    if ident.bottom_type == "shorts":
      t = 0.45
      cv.paint(cv.capsule(a, (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])), lw * 1.1),
               dark(ident.bottom, k))
    cv.paint(cv.ellipse(b[0] + f * lw * 0.5, b[1] - 0.2 * lw, lw * 1.3, lw * 0.75), dark(ident.shoes, k))
  if ident.bottom_type == "skirt":
    m, _, _ = cv.trapezoid(cx, hip - 0.02 * P, knee, ww, ww * 1.5)
    cv.paint(m, ident.bottom)
  else:
    cv.paint(cv.trapezoid(cx, hip - 0.03 * P, hip + 0.06 * P, ww, ww * 1.02)[0], ident.bottom)

  # Torso with its pattern and cylinder shading.
  m, u, v = cv.trapezoid(cx, sh_y, hip + 0.01 * P, sw, ww)
  cv.paint(m, _pattern_color(ident, u, v, view))

  # Arms and hands.
  arm_cols = [ident.top]
  if side:
    arms = [((cx, sh_y + aw), (cx + swing, hip + 0.02 * P))]
  else:
    ax = sw + aw * 0.4
    arms = [((cx - ax, sh_y + aw), (cx - ax - 0.01 * P, hip + 0.02 * P)),
            ((cx + ax, sh_y + aw), (cx + ax + 0.01 * P, hip + 0.02 * P))]
  for a, b in arms:
    cv.paint(cv.capsule(a, b, aw), ident.skin if ident.short_sleeves else arm_cols[0])
    if ident.short_sleeves:
      mid = (a[0] + 0.35 * (b[0] - a[0]), a[1] + 0.35 * (b[1] - a[1]))
      cv.paint(cv.capsule(a, mid, aw * 1.1), ident.top)
    cv.paint(cv.ellipse(b[0], b[1] + aw * 0.6, aw * 0.9, aw), ident.skin)

  # Neck, head, hair, hat.
  cv.paint(cv.rect(cx, sh_y - 0.015 * P, hr * 0.4, 0.025 * P), ident.skin)
  hx_r = hr * 0.8
  cv.paint(cv.ellipse(cx, hy, hx_r, hr), ident.skin)
  if view == "back":
    cv.paint(cv.ellipse(cx, hy - 0.05 * hr, hx_r * 1.06, hr * 1.04), ident.hair)
    if ident.long_hair:
      cv.paint(cv.rect(cx, sh_y + 0.03 * P, hr * 0.9, 0.06 * P), ident.hair)
  elif side:
    head = cv.ellipse(cx, hy, hx_r * 1.05, hr * 1.05)  # hair on the back half
    cv.paint(Band(head.r0, head.m * ((cv.x - cx) * f < hx_r * 0.15) * (cv.ys(head) < hy + 0.5 * hr)),
             ident.hair)
    cv.paint(cv.ellipse(cx, hy - 0.35 * hr, hx_r * 1.05, hr * 0.75), ident.hair)
  else:
    cv.paint(cv.ellipse(cx, hy - 0.35 * hr, hx_r * 1.08, hr * 0.75), ident.hair)
  if ident.hat is not None:
    cv.paint(cv.rect(cx, hy - 0.65 * hr, hx_r * 1.05, 0.45 * hr), ident.hat)
    cv.paint(cv.rect(cx + f * hx_r * 0.5, hy - 0.3 * hr, hx_r * (1.25 + 0.4 * abs(f)), 0.1 * hr), ident.hat)

  # Backpack (back view: body; front view: straps), shoulder bag.
  if ident.backpack is not None and not side:
    if view == "back":
      cv.paint(cv.rect(cx, (sh_y + hip) / 2, sw * 0.72, (hip - sh_y) / 2 - 0.04 * P), ident.backpack)
    else:
      for s in (-1, 1):
        cv.paint(cv.rect(cx + s * sw * 0.55, sh_y + 0.09 * P, 0.018 * P, 0.1 * P), dark(ident.backpack, 0.6))
  if ident.bag is not None:
    img_side = -ident.bag_side if view == "front" else ident.bag_side
    visible_side = 1 if view == "right" else -1           # facing right shows the right side
    if side:
      cv.paint(cv.rect(cx, sh_y + 0.12 * P, 0.012 * P, 0.12 * P), dark(ident.bag, 0.6))
      if ident.bag_side == visible_side:
        cv.paint(cv.rect(cx - f * 0.02 * P, hip, 0.06 * P, 0.07 * P), ident.bag)
    else:
      bx = cx + img_side * (ww + 0.06 * P)
      cv.paint(cv.capsule((cx - img_side * sw * 0.7, sh_y), (bx, hip - 0.05 * P), 0.012 * P),
               dark(ident.bag, 0.6))
      cv.paint(cv.rect(bx, hip, 0.06 * P, 0.07 * P), ident.bag)


def render_image(ident: Identity | None, cam: Camera, rng: np.random.Generator,
                 image_size: tuple[int, int], junk: bool = False) -> np.ndarray:
  """One pedestrian image, uint8 `[h, w, 3]` (`image_size = (h, w)`).

  `junk=True` imitates a bad detection: background only, or a person far too
  large and off-centre.
  """
  h, w = image_size
  h2, w2 = 2 * h, 2 * w
  oy, ox = rng.integers(0, cam.pad + 1, 2)
  cv = _Canvas(cam.background[oy:oy + h2, ox:ox + w2].copy())
  view = VIEWS[rng.choice(4, p=cam.view_probs)]
  if ident is not None and not (junk and rng.random() < 0.3):
    scale = cam.scale * ident.height * rng.uniform(0.95, 1.05)
    if junk:
      scale *= rng.uniform(1.6, 2.4)
    height = min(scale, 0.98) * h2 if not junk else scale * h2
    top = (h2 - height) / 2 + rng.normal(0, 0.5 * cam.jitter) * h2
    cx = w2 * (0.5 + cam.x_offset + rng.normal(0, cam.jitter))
    if junk:
      top -= rng.uniform(0, 0.5) * height
      cx += rng.choice([-1, 1]) * rng.uniform(0.2, 0.5) * w2
    paint_person(cv, ident, view, cx, top, height, rng)
  if rng.random() < cam.occlusion:  # foreground occluder from the bottom
    oh = rng.uniform(0.1, 0.35) * h2
    cv.paint(cv.rect(rng.uniform(0, w2), h2 - oh / 2, rng.uniform(0.3, 0.8) * w2, oh / 2), cam.occluder)
  small = Image.fromarray((np.clip(cv.img, 0, 1) * 255 + 0.5).astype(np.uint8))
  small = np.asarray(small.resize((w, h), Image.Resampling.LANCZOS), np.float32)
  x = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
  light = (cam.gain * rng.uniform(0.9, 1.1) / 255) * (1 + cam.slope * x)[None, :, None] * cam.cast
  idx = np.clip(small * light * (_LUT_SIZE - 1), 0, _LUT_SIZE - 1).astype(np.int32)
  pil = Image.fromarray(_tone_curve(cam.gamma, cam.contrast)[idx])
  if cam.blur > 0.15:
    pil = pil.filter(ImageFilter.GaussianBlur(cam.blur))
  out = np.asarray(pil, np.float32) + rng.normal(0, cam.noise * 255, (h, w, 3))
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


_LUT_SIZE = 1024


def _tone_curve(gamma: float, contrast: float) -> np.ndarray:
  """Camera response `[_LUT_SIZE]` uint8: linear light in [0, 1] -> gamma, contrast."""
  v = np.linspace(0, 1, _LUT_SIZE) ** gamma
  return (np.clip((v - 0.5) * contrast + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)
