"""Shapes: a synthetic text-to-image data set of flat coloured shapes, and ShapesEval, GenEval's six categories
scored by classical image analysis.

    generate_dataset(out_dir, n, size, seed)              the training set, in the trainer's image-folder format
    self_check(n, seed)                                   ShapesEval on ground-truth renders (the scorer's accuracy)
    evaluate.evaluate(generate_fn, n, seed, seen_pairs)   ShapesEval on a text-to-image model

(`evaluate` is not re-exported here: the name would hide the submodule `sana.shapes.evaluate`.)
"""

from sana.shapes.captions import Caption, Phrase, check_caption, parse_caption, scene_captions, scene_for_caption
from sana.shapes.evaluate import (
    Category,
    EvalPrompt,
    EvalReport,
    make_eval_prompts,
    pipeline_generate_fn,
    render_prompts,
    score_image,
    self_check,
)
from sana.shapes.generate import GenerateReport, dataset_seen_pairs, generate_dataset, make_sample, sample_name
from sana.shapes.scene import (
    PALETTE,
    Colour,
    Relation,
    Scene,
    SceneConfig,
    Shape,
    Size,
    holdout_from_list,
    render,
    sample_scene,
)
from sana.shapes.vision import Detection, DetectorConfig, detect_objects

__all__ = [
    "PALETTE",
    "Caption",
    "Category",
    "Colour",
    "Detection",
    "DetectorConfig",
    "EvalPrompt",
    "EvalReport",
    "GenerateReport",
    "Phrase",
    "Relation",
    "Scene",
    "SceneConfig",
    "Shape",
    "Size",
    "check_caption",
    "dataset_seen_pairs",
    "detect_objects",
    "generate_dataset",
    "holdout_from_list",
    "make_eval_prompts",
    "make_sample",
    "parse_caption",
    "pipeline_generate_fn",
    "render",
    "render_prompts",
    "sample_name",
    "sample_scene",
    "scene_captions",
    "scene_for_caption",
    "score_image",
    "self_check",
]
