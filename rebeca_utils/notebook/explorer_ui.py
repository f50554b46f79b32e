"""The explorer panel of notebook 13 (ipywidgets). Widgets only: every action is one call to studies.explorer.

CSS classes (`rebeca-*`) name the parts the browser test drives: user, omega, generate, grid, feedback, update,
gallery, fit, page, save, load.
"""
from __future__ import annotations

import io
from pathlib import Path

import ipywidgets as W
import numpy as np
from PIL import Image

from ..studies.explorer import Explorer, Grid, to_pil

THUMB = 96  # pixels per thumbnail in the panel


def png(image) -> bytes:
    """PNG bytes of an (H, W, 3) float image in [0, 1] or of an image file."""
    im = Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else to_pil(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def rating_toggle(value: str, on_change, cls: str) -> W.ToggleButtons:
    """– / ✓ / ✗ under a thumbnail (values "none", "like", "dislike"); `cls` names it for the browser test."""
    toggle = W.ToggleButtons(options=[("–", "none"), ("✓", "like"), ("✗", "dislike")], value=value,
                             tooltips=["no rating", "like", "dislike"], style=W.ToggleButtonsStyle(button_width="28px"))
    toggle.add_class(cls)
    toggle.observe(lambda ch: on_change(ch["new"]), names="value")
    return toggle


def thumb(image, caption: str = "", cls: str = "rebeca-thumb") -> W.VBox:
    """A thumbnail with a caption; `cls` names it for the browser test."""
    img = W.Image(value=png(image), format="png", width=THUMB, height=THUMB)
    img.add_class(cls)
    return W.VBox([img, W.HTML(f"<small>{caption}</small>")])


class Panel:
    """Explore tab (user, ω, decoder CFG, n, seed, compare, Generate) and New-user tab (gallery, Fit me, save/load)."""

    def __init__(self, ex: Explorer, cfg_scale: float, decoder_cfg: float, n_images: int, seed: int,
                 users_dir: str | Path, per_page: int = 12):
        self.ex, self.users_dir, self.per_page, self.ratings, self.n_grids = ex, Path(users_dir), per_page, {}, 0
        self.shown: list[Grid] = []  # the grids on screen; the first one takes feedback
        self.answers: dict[int, int] = {}  # image j of the first grid -> 1 like / 0 dislike
        opts = [(name, uid) for uid, name in ex.names.items()]
        self.user = W.Dropdown(options=opts, description="user")
        self.other = W.Dropdown(options=opts, value=opts[min(1, len(opts) - 1)][1], description="vs user")
        self.omega = W.FloatSlider(value=cfg_scale, min=1.0, max=15.0, step=0.5, description="prior ω")
        self.dcfg = W.FloatSlider(value=decoder_cfg, min=1.0, max=10.0, step=0.5, description="decoder CFG")
        self.n = W.IntSlider(value=n_images, min=1, max=16, description="images")
        self.seed = W.IntText(value=seed, description="seed")
        self.compare = W.Checkbox(value=False, description="compare users")
        self.go = W.Button(description="Generate", button_style="primary")
        self.update_btn = W.Button(description="Update from my ratings", button_style="warning",
                                   layout=W.Layout(width="auto"))
        self.bar, self.status = W.IntProgress(value=0, min=0, max=1), W.HTML()
        self.strip, self.grid = W.HBox(), W.VBox()
        self.strip_label = W.HTML()
        named = {"user": self.user, "other": self.other, "omega": self.omega, "generate": self.go, "grid": self.grid,
                 "status": self.status, "compare": self.compare, "strip": self.strip, "update": self.update_btn}
        for c, w in named.items():
            w.add_class(f"rebeca-{c}")
        self.user.observe(lambda _: self.show_liked(), names="value")
        self.go.on_click(lambda _: self.generate())
        self.update_btn.on_click(lambda _: self.update())
        self.page = W.IntText(value=0, description="page")
        self.page.add_class("rebeca-page")
        self.page.observe(lambda _: self.show_gallery(), names="value")
        self.gallery = W.GridBox(layout=W.Layout(grid_template_columns=f"repeat(6, {THUMB + 20}px)"))
        self.gallery.add_class("rebeca-gallery")
        self.name = W.Text(value="new user", description="name")
        self.fit_btn = W.Button(description="Fit me", button_style="success")
        self.fit_btn.add_class("rebeca-fit")
        self.fit_out, self.path = W.Output(), W.Text(description="file", layout=W.Layout(width="60%"))
        self.save_btn, self.load_btn = W.Button(description="Save user"), W.Button(description="Load user")
        for c, w in {"save": self.save_btn, "load": self.load_btn, "path": self.path, "fit-out": self.fit_out}.items():
            w.add_class(f"rebeca-{c}")
        self.fit_btn.on_click(lambda _: self.fit())
        self.save_btn.on_click(lambda _: self.save())
        self.load_btn.on_click(lambda _: self.load())
        self.show_liked()
        self.show_gallery()

    def widget(self) -> W.Tab:
        explore = W.VBox([W.HBox([self.user, self.compare, self.other]), self.strip_label,
                          self.strip, W.HBox([self.omega, self.dcfg]), W.HBox([self.n, self.seed, self.go]),
                          W.HBox([self.bar, self.status]), self.grid,
                          W.HBox([W.HTML("Like (✓) / dislike (✗) images of the first row, then&nbsp;"), self.update_btn])])
        new = W.VBox([W.HTML("Like (✓) or dislike (✗) a few images, then <b>Fit me</b> (user inversion, notebook 12)."),
                      self.page, self.gallery, W.HBox([self.name, self.fit_btn]), self.fit_out,
                      W.HBox([self.path, self.save_btn, self.load_btn])])
        # Lab pads toggle buttons wider than a thumbnail's third: ✓ and ✗ would show as "✓…"
        css = W.HTML("<style>.rebeca-feedback button, .rebeca-rating button {padding: 0 !important; "
                     "min-width: 0 !important; text-overflow: clip !important}</style>")
        tab = W.Tab(children=[W.VBox([css, explore]), new])
        tab.set_title(0, "Explore")
        tab.set_title(1, "New user")
        return tab

    def show_liked(self) -> None:
        new = self.user.value in self.ex.likes
        self.strip_label.value = f"<b>liked {'in the gallery' if new else 'in training'}</b>"
        self.strip.children = [thumb(p) for p in self.ex.liked(self.user.value, 8)]

    def show_gallery(self) -> None:
        cells = []
        for name in self.ex.gallery(max(0, self.page.value), self.per_page):
            toggle = rating_toggle(self._label(name), lambda v, n=name: self._rate(n, v), "rebeca-rating")
            cells.append(W.VBox([thumb(self.ex.image_dir / name), toggle]))
        self.gallery.children = cells

    def _label(self, name: str) -> str:
        return {1: "like", 0: "dislike"}.get(self.ratings.get(name), "none")

    def _rate(self, name: str, label: str) -> None:
        if label == "none":
            self.ratings.pop(name, None)
        else:
            self.ratings[name] = 1 if label == "like" else 0

    def _row(self, g: Grid, feedback: bool = False) -> W.VBox:
        mark = "*" if g.fitted_score else ""  # v*: from a verifier row fitted on the user's ratings
        caps = [f"v{mark} = {s:.2f}" if np.isfinite(s) else "v: no row" for s in g.scores]
        cells = []
        for j, (im, c) in enumerate(zip(g.images, caps)):
            cell = [thumb(im, c, "rebeca-grid-image")]
            if feedback:  # a like or dislike on a generated image: the user's feedback (Update from my ratings)
                cell.append(rating_toggle("none", lambda v, j=j: self._answer(j, v), "rebeca-feedback"))
            cells.append(W.VBox(cell))
        note = " (v*: verifier row fitted on this user's ratings)" if g.fitted_score else ""
        return W.VBox([W.HTML(f"<b>{self.ex.names[g.user_id]}</b>{note}"), W.HBox(cells)])

    def _answer(self, j: int, label: str) -> None:
        if label == "none":
            self.answers.pop(j, None)
        else:
            self.answers[j] = 1 if label == "like" else 0

    def generate(self) -> list[Grid]:
        users = [self.user.value] + ([self.other.value] if self.compare.value else [])
        self.bar.max, self.bar.value = self.n.value * len(users), 0
        grids = []
        for i, u in enumerate(users):
            def tick(done, total, base=i * self.n.value):
                self.bar.value = base + done
            grids.append(self.ex.generate(u, self.omega.value, self.dcfg.value, self.n.value, self.seed.value, tick))
        self.n_grids += 1
        self.shown, self.answers = grids, {}
        self.grid.children = [self._row(g, feedback=i == 0) for i, g in enumerate(grids)]
        self.status.value = (f"grid {self.n_grids}: {', '.join(self.ex.names[u] for u in users)}, prior ω "
                             f"{self.omega.value:g}, decoder CFG {self.dcfg.value:g}, seed {self.seed.value}, "
                             f"{sum(g.seconds for g in grids):.1f} s")
        return grids

    def update(self) -> None:
        """Feedback: the first row's likes / dislikes update its user (ex.feedback), then a new grid."""
        if not self.shown or not self.answers:
            self.status.value = "rate an image of the first row (like / dislike) first"
            return
        g, answers = self.shown[0], dict(self.answers)
        seconds = self.ex.feedback(g, answers, seed=self.seed.value)
        self.user.value = g.user_id
        self.generate()
        self.status.value = (f"updated {self.ex.names[g.user_id]} from {len(answers)} ratings on generated images in "
                             f"{seconds:.1f} s; " + self.status.value)

    def fit(self) -> int | None:
        liked = [n for n, r in self.ratings.items() if r == 1]
        disliked = [n for n, r in self.ratings.items() if r == 0]
        with self.fit_out:
            self.fit_out.clear_output()
            if not liked and not disliked:
                print("rate at least one image first")
                return None
            try:
                uid, seconds = self.ex.fit(liked, disliked, self.name.value, progress=True)
            except (KeyError, ValueError) as exc:  # an Output widget would swallow it: say it where the user looks
                print(f"Fit me failed: {exc}")
                return None
            print(f"fitted {self.name.value!r} on {len(liked)} likes and {len(disliked)} dislikes in {seconds:.1f} s"
                  + (f"; {self.ex.note}" if self.ex.note else ""))
        self._add_option(uid)
        self.path.value = str(self.users_dir / f"{self.name.value.replace(' ', '_')}.safetensors")
        self.generate()
        return uid

    def _add_option(self, uid: int) -> None:
        """Offer a new user in both dropdowns and select it; the comparison user stays as chosen."""
        opts, other = [(name, u) for u, name in self.ex.names.items()], self.other.value
        self.user.options, self.other.options = opts, opts  # assigning options resets the value
        self.user.value, self.other.value = uid, other

    def save(self) -> None:
        """Save the selected user to the file named beside the button."""
        with self.fit_out:
            print(f"saved {self.ex.save_user(self.user.value, self.path.value)}")

    def load(self) -> None:
        """Add the user saved in the file named beside the button."""
        with self.fit_out:
            try:
                uid = self.ex.load_user(self.path.value)
            except (OSError, ValueError) as exc:  # e.g. fitted on another prior: one line, in the panel
                print(f"Load user failed: {exc}")
                return
            print(f"loaded {self.ex.names[uid]!r} as user id {uid}")
        self._add_option(uid)
