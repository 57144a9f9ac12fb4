"""Subject nodes: one reference subject, and the ordered list of subjects."""
from __future__ import annotations

from comfy_api.latest import io

from ..models.layout.subject import MAX_SUBJECTS, Subject, SubjectError, subject_list
from . import types
from .errors import node_error, number_error
from .search import aliases

CATEGORY = "Troupe/subjects"


class TroupeSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TroupeSubject",
            **aliases("reference image", "personalization", "identity", "subject reference"),
            display_name="Troupe Subject",
            category=CATEGORY,
            description="One subject: its reference image(s), an optional mask of the subject inside the "
                        "reference, the word that names it in the prompt, and its weight.",
            inputs=[
                io.Image.Input("image", tooltip="Reference photo(s) of the subject; a batch gives several views."),
                io.String.Input("label", default="",
                                tooltip='The concept word that names this subject in the prompt, e.g. "corgi".'),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How strongly this subject is injected (1.0 = as trained)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional mask of the subject inside the reference image (white = subject); "
                                      "encoders crop to it and blank the background."),
            ],
            outputs=[types.Subject.Output(display_name="subject",
                                          tooltip="One subject (reference photos, label, weight, mask): connect it to a Troupe Subject List slot.")],
        )

    @classmethod
    def validate_inputs(cls, weight: float = 1.0) -> bool | str:
        """At queue time: NaN passes ComfyUI's min/max (declaring ``weight`` here turns those off, so check it all)."""
        return number_error("TroupeSubject", "weight", weight, 0.0, 10.0) or True

    @classmethod
    def execute(cls, image, label: str, weight: float, mask=None) -> io.NodeOutput:
        try:
            return io.NodeOutput(Subject(image=image, label=label, mask=mask, weight=weight))
        except SubjectError as e:
            raise node_error("TroupeSubject", None, f"input {e}") from None


class TroupeSubjectList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = [
            types.Subject.Input(f"subject_{i}", optional=i > 1,
                                tooltip=f"Subject {i}: placed in layout box {i}." if i > 1 else
                                "Subject 1: placed in layout box 1. Connect up to 8 subjects in box order.")
            for i in range(1, MAX_SUBJECTS + 1)
        ]
        return io.Schema(
            node_id="TroupeSubjectList",
            **aliases("subjects", "multi subject", "reference list"),
            display_name="Troupe Subject List",
            category=CATEGORY,
            description="Collect up to 8 subjects; the order (skipping empty slots) is the layout's box order.",
            inputs=slots,
            outputs=[types.Subjects.Output(display_name="subjects",
                                           tooltip="The subjects in slot order (empty slots skipped): subject i belongs to layout box i.")],
        )

    @classmethod
    def execute(cls, **subjects) -> io.NodeOutput:
        ordered = [subjects.get(f"subject_{i}") for i in range(1, MAX_SUBJECTS + 1)]
        try:
            return io.NodeOutput(subject_list(ordered))
        except SubjectError as e:
            raise node_error("TroupeSubjectList", None, str(e)) from None
