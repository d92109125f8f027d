"""Chat with the model you just trained, without leaving the notebook (ipywidgets).

    from mmkit.viz.chat import chat
    chat(model)                 # a trained model, or a checkpoint folder

A small front end over the same functions as the Gradio demo (``mmkit.demo``):
``ChatSession.stream`` checks the message and streams the answer, ``inspect_last``
draws what the model looked at. Nothing about chatting is written twice; this file
only lays out widgets and shows what those functions return.

    [ Upload images ]  [ question ....................... ]  [ Send ]  [ Clear ]  [ Inspect ]
    max new tokens ----o----     temperature o----------
    conversation (HTML, the answer grows as it streams)
    inspect panel (heatmaps over the image + token costs)
"""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any, Sequence

from mmkit.demo import ChatError, ChatSession, inspect_last

__all__ = ["NotebookChat", "chat"]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class NotebookChat:
    """The widget and its handlers; ``send`` / ``clear`` / ``inspect`` can be called directly.

    Args:
        model: a trained model (``mmkit.train.load_model`` / the Trainer's model) or a
            checkpoint folder.
        max_new_tokens / temperature: initial generation settings (sliders).
    """

    def __init__(self, model: Any, *, max_new_tokens: int = 48, temperature: float = 0.0):
        import ipywidgets as w

        if isinstance(model, (str, Path)):
            from mmkit.train import load_model

            model = load_model(model)
        model.eval()
        self.chat = ChatSession(model)
        self.log: list[tuple[str, str]] = []  # (role, html) shown in the conversation
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Images")
        self.text = w.Text(placeholder="Ask about the image(s)…", layout=w.Layout(width="40%"))
        self.send_btn = w.Button(description="Send", button_style="primary")
        self.clear_btn = w.Button(description="Clear")
        self.inspect_btn = w.Button(description="Inspect")
        self.max_tokens = w.IntSlider(value=max_new_tokens, min=1, max=256, description="max tokens")
        self.temperature = w.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature")
        self.conversation = w.HTML(self._render())
        self.info = w.HTML(self.chat.describe().replace("**", ""))
        self.maps = w.HBox([])
        self.inspect_text = w.HTML("")
        self.send_btn.on_click(lambda _: self.send())
        self.clear_btn.on_click(lambda _: self.clear())
        self.inspect_btn.on_click(lambda _: self.inspect())
        self.widget = w.VBox([
            self.info,
            w.HBox([self.upload, self.text, self.send_btn, self.clear_btn, self.inspect_btn]),
            w.HBox([self.max_tokens, self.temperature]),
            self.conversation,
            self.maps,
            self.inspect_text,
        ])

    # ------------------------------------------------------------------ views
    def _render(self, extra: Sequence[tuple[str, str]] = ()) -> str:
        rows = [*self.log, *extra]
        if not rows:
            return "<i>Upload an image, type a question, press Send.</i>"
        out = []
        for role, body in rows:
            who = "you" if role == "user" else self.chat.label
            color = "#1f77b4" if role == "user" else "#333"
            out.append(f"<div style='margin:2px 0'><b style='color:{color}'>{html.escape(who)}:</b> {body}</div>")
        return "".join(out)

    def _uploaded(self) -> list[tuple[str, bytes]]:
        return [(f["name"], bytes(f["content"])) for f in (self.upload.value or ())]

    # --------------------------------------------------------------- handlers
    def send(self, text: str | None = None, images: Sequence[Any] | None = None) -> str | None:
        """Send ``text`` (default: the text box) with ``images`` (default: the uploads).

        Streams into the conversation; returns the answer, or None when the message
        was refused (the reason is shown in the conversation).
        """
        text = self.text.value if text is None else text
        files = self._uploaded() if images is None else list(images)
        names = ", ".join(f[0] if isinstance(f, tuple) else f"image {i + 1}" for i, f in enumerate(files))
        shown = html.escape(text if len(text) <= 300 else text[:300] + f"… ({len(text):,} characters)")
        user = ("user", shown + (f" <i>[{html.escape(names)}]</i>" if names else ""))
        answer = None
        try:
            turn = self.chat.check(text, files)
            for partial in self.chat.stream(turn=turn, max_new_tokens=self.max_tokens.value,
                                               temperature=self.temperature.value):
                self.conversation.value = self._render([user, ("assistant", html.escape(partial))])
                answer = partial
            self.log += [user, ("assistant", html.escape(answer or ""))]
        except ChatError as e:
            self.log += [user, ("assistant", "⚠️ " + html.escape(str(e)).replace("\n", "<br>"))]
        self.conversation.value = self._render()
        self.text.value = ""
        self.upload.value = ()
        return answer

    def clear(self) -> None:
        self.chat.clear()
        self.log = []
        self.conversation.value = self._render()
        self.maps.children = ()
        self.inspect_text.value = ""

    def inspect(self) -> list:
        """Heatmaps of the last answer into the panel; returns [(PIL image, caption)]."""
        import ipywidgets as w

        try:
            gallery, summary = inspect_last(self.chat)
        except ChatError as e:
            self.maps.children = ()
            self.inspect_text.value = "⚠️ " + html.escape(str(e))
            return []
        self.maps.children = tuple(
            w.VBox([w.Image(value=_png(img), format="png", width=160), w.Label(caption)])
            for img, caption in gallery)
        self.inspect_text.value = "<br>".join(
            html.escape(line).replace("**", "") for line in summary.split("\n\n"))
        return gallery


def chat(model: Any, **kwargs: Any):
    """The chat widget for ``model`` (a model or a checkpoint folder); display it in a cell."""
    return NotebookChat(model, **kwargs).widget
