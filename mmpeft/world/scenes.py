"""A procedural image+text world: scenes of coloured shapes and faces under a sky, drawn with PIL, with captions.

Every scene is a pure function of `(seed, index)`, so pretraining can draw as many distinct pairs as it
likes without storing any, and any example can be rebuilt from its two numbers. Some (colour, shape)
combinations are held out of pretraining (`HELD_OUT`) so zero-shot results say something about
generalisation rather than memory.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (135, 45, 180),
    "orange": (245, 135, 25),
    "pink": (250, 135, 195),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "face")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "heart": "hearts",
           "face": "faces"}
EXPRESSIONS = ("smiling", "neutral", "frowning")  # faces only
COUNTS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "center", "right")
WEATHERS = ("sunny", "cloudy", "rainy", "snowy", "night")

POLARITY_OF_EXPRESSION = {"smiling": "positive", "neutral": "neutral", "frowning": "negative"}
# The mood of a day: pretraining captions of these skies sometimes give it as a remark instead of naming the sky.
MOOD_OF_WEATHER = {"sunny": "positive", "cloudy": "neutral", "rainy": "negative"}
# Remarks people add to a picture, by polarity. In pretraining they stand in for the sky (all of them); in the
# sentiment task they carry the post's own polarity (the first half in training posts, the rest in val/test).
OPINIONS = {
    "positive": ("i love this", "what a wonderful sight", "this made my day", "so happy to see this",
                 "absolutely lovely", "best moment ever", "what a great day", "pure joy"),
    "neutral": ("just posted this", "here is a picture", "taken this morning", "another photo from today",
                "a picture from the walk", "posting this for the record", "seen on the way home", "photo of the day"),
    "negative": ("i hate this", "what an awful sight", "this ruined my day", "so sad to see this",
                 "absolutely terrible", "worst moment ever", "what a gloomy day", "pure misery"),
}

# (colour, shape) pairs never shown in pretraining; zero-shot evaluation is measured on them.
HELD_OUT = frozenset({("red", "star"), ("blue", "heart"), ("green", "triangle"), ("yellow", "face"),
                      ("purple", "circle"), ("orange", "square"), ("pink", "star")})

_SKY = {
    "sunny": ((120, 190, 245), (150, 215, 250)),
    "cloudy": ((150, 160, 175), (185, 190, 200)),
    "rainy": ((85, 95, 115), (110, 120, 140)),
    "snowy": ((200, 205, 215), (230, 232, 238)),
    "night": ((15, 20, 50), (30, 35, 75)),
}
WEATHER_PHRASES = {
    "sunny": ("on a sunny day", "in the sun", "under a sunny sky"),
    "cloudy": ("on a cloudy day", "under clouds", "under a cloudy sky"),
    "rainy": ("in the rain", "on a rainy day", "under a rainy sky"),
    "snowy": ("in the snow", "on a snowy day", "under falling snow"),
    "night": ("at night", "in the dark night", "under a night sky"),
}
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
}
CAPTION_TEMPLATES = (
    "a photo of {things} {position} {weather}",
    "{things} {position} {weather}",
    "a picture of {things} {weather}, {position}",
    "{weather}, {things} {position}",
    "a drawing of {things} {position} {weather}",
)
_SKYLESS_TEMPLATES = ("a photo of {things} {position}", "{things} {position}", "a picture of {things}, {position}",
                      "a drawing of {things} {position}")


@dataclass(frozen=True)
class Scene:
    """What one image shows: `count` objects of one colour and shape in one column, under one sky."""

    colour: str
    shape: str
    count: int
    position: str
    weather: str
    expression: str | None = None  # faces only
    size: int = 16  # object size in pixels at 64 px
    seed: int = 0  # drawing details: sky texture, jitter

    def __post_init__(self) -> None:
        for name, value, valid in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                   ("count", self.count, COUNTS), ("position", self.position, POSITIONS),
                                   ("weather", self.weather, WEATHERS)):
            if value not in valid:
                raise ValueError(f"scene {name} must be one of {list(valid)}, got {value!r}")
        if (self.shape == "face") != (self.expression is not None):
            raise ValueError("a face needs an expression and only a face has one: "
                             f"shape={self.shape!r}, expression={self.expression!r}")
        if self.expression is not None and self.expression not in EXPRESSIONS:
            raise ValueError(f"expression must be one of {list(EXPRESSIONS)}, got {self.expression!r}")

    def _sized(self, rng: random.Random) -> Scene:
        """This scene with an object size drawn for its count: one object is large, three fit a column."""
        low, high = {1: (20, 26), 2: (17, 22), 3: (14, 19)}[self.count]
        return dataclasses.replace(self, size=rng.randint(low, high))

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    def things(self, rng: random.Random | None = None) -> str:
        """'two smiling red faces', 'one blue star', 'a blue star'."""
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        words = ([self.expression] if self.expression else []) + [self.colour, noun]
        count = COUNTS[self.count]
        if self.count == 1 and rng is not None and rng.random() < 0.5:
            count = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([count, *words])


def sample_scene(rng: random.Random, *, held_out: bool | None = False, shape: str | None = None,
                 expression: str | None = None, colour: str | None = None) -> Scene:
    """A random scene; `held_out=False` never draws a held-out pair, `True` only those, `None` either."""
    while True:
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(tuple(COLOURS))
        if held_out is None or ((c, s) in HELD_OUT) == held_out:
            break
        if shape and colour:
            raise ValueError(f"({colour}, {shape}) cannot satisfy held_out={held_out}")
    return Scene(colour=c, shape=s, count=rng.choice(tuple(COUNTS)), position=rng.choice(POSITIONS),
                 weather=rng.choice(WEATHERS),
                 expression=(expression or rng.choice(EXPRESSIONS)) if s == "face" else None,
                 size=0, seed=rng.getrandbits(31))._sized(rng)


def caption(scene: Scene, rng: random.Random, *, sky: bool = True) -> str:
    """One of several phrasings describing every attribute of the scene (all but the sky with `sky=False`)."""
    template = rng.choice(CAPTION_TEMPLATES if sky else _SKYLESS_TEMPLATES)
    return template.format(things=scene.things(rng), position=rng.choice(POSITION_PHRASES[scene.position]),
                           weather=rng.choice(WEATHER_PHRASES[scene.weather]))


def scene_rng(seed: int, index: int, stream: str = "") -> random.Random:
    """The random stream of example `index` of world `seed` (independent of any other example)."""
    return random.Random(f"{seed}:{index}:{stream}")


def pretraining_pair(seed: int, index: int) -> tuple[Scene, str]:
    """Example `index` of the pretraining stream: a scene outside HELD_OUT and a caption of it.

    A third of the scenes are faces. Half of the captions of sunny, cloudy and rainy scenes give the mood of
    the day as a remark instead of naming the sky ("what a wonderful sight" in the sun, "just posted this"
    under clouds, "what a gloomy day" in the rain), as web alt-text does: to match such a caption to its image
    the text tower has to learn what every opinion phrase means, which is what the sentiment task builds on.
    """
    rng = scene_rng(seed, index, "pretrain")
    shape = "face" if rng.random() < 1 / 3 else rng.choice([s for s in SHAPES if s != "face"])
    scene = sample_scene(rng, held_out=False, shape=shape)
    mood = MOOD_OF_WEATHER.get(scene.weather)
    if mood is None or rng.random() < 0.5:
        return scene, caption(scene, rng)
    remark, text = rng.choice(OPINIONS[mood]), caption(scene, rng, sky=False)
    return scene, f"{remark}: {text}" if rng.random() < 0.5 else f"{text}, {remark}"


# ---- drawing -----------------------------------------------------------------------------------------------


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _sky(draw: ImageDraw.ImageDraw, weather: str, rng: random.Random, size: int) -> None:
    top, bottom = (_jitter(c, rng, 10) for c in _SKY[weather])
    for y in range(size):
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    if weather == "sunny":
        r = rng.randint(5, 8)
        x, y = rng.choice((rng.randint(2, 12), rng.randint(size - 12, size - 2))), rng.randint(2, 10)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 235, 120))
    elif weather == "cloudy":
        for _ in range(rng.randint(2, 4)):
            x, y, w = rng.randint(0, size), rng.randint(0, size // 3), rng.randint(10, 18)
            draw.ellipse((x - w, y - w // 3, x + w, y + w // 3), fill=_jitter((235, 238, 242), rng, 8))
    elif weather == "rainy":
        for _ in range(rng.randint(25, 40)):
            x, y = rng.randint(-8, size), rng.randint(0, size)
            draw.line([(x, y), (x + 3, y + 6)], fill=(160, 180, 210), width=1)
    elif weather == "snowy":
        for _ in range(rng.randint(30, 50)):
            x, y = rng.randint(0, size), rng.randint(0, size)
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 255))
    else:  # night: a moon and stars
        for _ in range(rng.randint(10, 20)):
            x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
            draw.point((x, y), fill=(230, 230, 200))
        x, y, r = rng.randint(4, size - 4), rng.randint(3, 9), rng.randint(3, 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(235, 235, 210))


def _star(cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = rotation + k * math.pi / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, scene: Scene, cx: float, cy: float, r: float,
                 rng: random.Random) -> None:
    fill = _jitter(COLOURS[scene.colour], rng, 12)
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1, rng.uniform(-0.2, 0.2)), fill=fill)
    elif scene.shape == "heart":
        h = r * 0.52
        draw.ellipse((cx - r, cy - r * 0.8, cx, cy - r * 0.8 + 2 * h), fill=fill)
        draw.ellipse((cx, cy - r * 0.8, cx + r, cy - r * 0.8 + 2 * h), fill=fill)
        draw.polygon([(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=fill)
    else:  # face: eyes and a mouth that carries the expression
        draw.ellipse(box, fill=fill, outline=(40, 30, 20))
        ink, eye = (25, 20, 15), max(1.0, r * 0.16)
        for ex in (cx - r * 0.38, cx + r * 0.38):
            draw.ellipse((ex - eye, cy - r * 0.35 - eye, ex + eye, cy - r * 0.35 + eye), fill=ink)
        w, width = r * 0.55, max(1, round(r / 6))
        if scene.expression == "smiling":
            draw.arc((cx - w, cy - r * 0.25, cx + w, cy + r * 0.6), 20, 160, fill=ink, width=width)
        elif scene.expression == "frowning":
            draw.arc((cx - w, cy + r * 0.2, cx + w, cy + r * 1.0), 200, 340, fill=ink, width=width)
        else:
            draw.line([(cx - w, cy + r * 0.4), (cx + w, cy + r * 0.4)], fill=ink, width=width)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image: sky, then `count` objects stacked in the scene's column."""
    rng = random.Random(scene.seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    _sky(draw, scene.weather, rng, size)
    scale = size / IMAGE_SIZE
    r = scene.size * scale / 2
    column = size / 3
    x0 = POSITIONS.index(scene.position) * column
    band = size / scene.count
    for k in range(scene.count):
        cx = x0 + column / 2 + rng.uniform(-1.5, 1.5) * scale
        cy = band * (k + 0.5) + rng.uniform(-1, 1) * max(0.0, band / 2 - r - 1)
        cy = min(max(cy, r + 1), size - r - 1)
        _draw_object(draw, scene, cx, cy, r, rng)
    return image
