"""The module's ControlNet controls without Slicer (issue 12 item 5): the "Attention" segments, the loaded X-ray
as radiomics reference, the controls each model offers and their default scales (from ``/info``), what is
uploaded, and what the results list shows of a result's controls (its provenance)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "XRealSlicer"))

from XRealSlicerLib import controls, planning, results  # noqa: E402
from XRealSlicerLib.jobs import DONE, JobRunner  # noqa: E402
from XRealSlicerLib.request import CanvasGeometry, SegmentInput, build_inputs  # noqa: E402
from XRealSlicerLib.testing import ReplayEngineClient, replay_info  # noqa: E402
from XRealSlicerLib.vocabulary import ATTENTION, Vocabulary  # noqa: E402
from xreal_engine.control_spec import CONTROL_SCALE_RANGE  # noqa: E402
from xreal_engine.errors import InputError  # noqa: E402

SIZE = 64
CANVAS = CanvasGeometry((1, SIZE, SIZE), (400.0 / SIZE, 400.0 / SIZE, 1.0), "canvas")


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load()


def _disc(center, radius):
    rows, columns = np.ogrid[:SIZE, :SIZE]
    return ((rows - center[0]) ** 2 + (columns - center[1]) ** 2 <= radius**2).astype(np.uint8)[np.newaxis]


def _segments(vocabulary, *attention):
    anatomy = {t.meaning.label: t for t in vocabulary.anatomy_templates()}
    finding = vocabulary.finding_template("pneumonia", "Pneumonia")
    segments = [SegmentInput(anatomy[1].name, _disc((30, 46), 12), anatomy[1].terminology),
                SegmentInput(anatomy[2].name, _disc((30, 18), 12), anatomy[2].terminology),
                SegmentInput(anatomy[3].name, _disc((40, 34), 8), anatomy[3].terminology),
                SegmentInput(finding.name, _disc((30, 18), 4), finding.terminology)]
    names = [segment.name for segment in segments]
    for mask in attention:
        template = vocabulary.attention_template(names)
        names.append(template.name)
        segments.append(SegmentInput(template.name, mask, template.terminology))
    return segments


def _info(**controlnets):
    info = replay_info()
    info["controlnets"] = controlnets
    return info


def _xray():
    rows, columns = np.mgrid[:SIZE, :SIZE]
    return (1000.0 + 3.0 * rows + np.where(columns > 32, 200.0, 0.0))[np.newaxis]  # an X-ray's raw values


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_attention_segments_are_neither_anatomy_nor_findings(vocabulary):
    template = vocabulary.attention_template(["Heart", "Attention"])
    assert template.name == "Attention 2" and template.meaning.kind == ATTENTION
    assert vocabulary.classify("Attention").kind == ATTENTION
    assert vocabulary.classify("attention 3", template.terminology).kind == ATTENTION
    assert vocabulary.classify("Pneumonia").kind != ATTENTION
    assert vocabulary.classify("Look here", template.terminology).kind == ATTENTION  # renamed: by its codes
    assert "DCM^130404^Saliency" in template.terminology  # coded as the engine's SEG codes its attention region
    # two attention segments are one region; an unpainted one is left out with a note, not refused
    first, second = _disc((10, 10), 3), _disc((50, 50), 3)
    segments = _segments(vocabulary, first, second, np.zeros((1, SIZE, SIZE), np.uint8))
    inputs = build_inputs(segments, CANVAS, vocabulary, [1, 2, 3], ["pneumonia"])
    assert np.array_equal(inputs.attention, (first[0] | second[0]) > 0)
    assert [name for _mask, _finding, name in inputs.pathologies] == ["Pneumonia"]  # not a pathology
    assert inputs.warnings == ["The segment 'Attention 3' is empty and was left out."]
    assert build_inputs(_segments(vocabulary), CANVAS, vocabulary, [1, 2, 3], ["pneumonia"]).attention is None


def test_the_models_controlnets_and_default_scales_come_from_its_info():
    assert controls.model_controlnets({"controlnets": {"sobel": 0.5, "attention": 1.0}}) == {"sobel": 0.5,
                                                                                             "attention": 1.0}
    # xreal_model.json's own form (the local model before its engine runs), and one nested under "model"
    assert controls.model_controlnets({"controlnets": {"canny": {"scale": 0.2}, "lungs": {}}}) == {"canny": 0.2,
                                                                                                   "lungs": 1.0}
    assert controls.model_controlnets({"model": {"controlnets": {"texture": 2.0}}}) == {"texture": 2.0}
    # an engine newer than the module: unknown controls left out, an odd scale replaced by a valid default
    assert controls.model_controlnets({"controlnets": {"gaze3d": 1.0, "sobel": 9.0}}) == {"sobel": 1.0}
    assert controls.model_controlnets({}) == {} == controls.model_controlnets(None)
    assert controls.reference_choices({"texture": 1.0, "sobel": 1.0, "attention": 1.0}) == [
        ("sobel", "Sobel edges"), ("texture", "Texture (local entropy)")]  # the engine's order, radiomics only
    assert controls.node_defaults({"canny": 0.3, "attention": 0.7}, "sobel") == {
        "referenceControl": "canny", "referenceScale": 0.3, "attentionScale": 0.7}
    assert controls.node_defaults({"sobel": 0.5, "canny": 0.3}, "canny") == {"referenceControl": "canny",
                                                                            "referenceScale": 0.3}
    assert controls.node_defaults({}, "sobel") == {"referenceControl": "", "useReference": False}
    assert controls.scale_range() == tuple(float(v) for v in CONTROL_SCALE_RANGE)


def test_only_the_controlnets_the_model_has_apply():
    def states(controlnets, use_reference=False):
        found = planning.control_states(interpolate=False, edit_mode=False, fast=False, controlnets=controlnets,
                                        use_reference=use_reference)
        return {key: found[key] for key in ("reference", "referenceControl", "referenceScale", "attention",
                                            "controlStages")}

    assert states({}) == dict.fromkeys(("reference", "referenceControl", "referenceScale", "attention",
                                        "controlStages"), False)
    assert states({"attention": 1.0}) == {"reference": False, "referenceControl": False, "referenceScale": False,
                                          "attention": True, "controlStages": True}
    assert states({"sobel": 1.0}) == {"reference": True, "referenceControl": False, "referenceScale": False,
                                      "attention": False, "controlStages": True}
    assert states({"sobel": 1.0}, use_reference=True)["referenceScale"]


def test_the_loaded_xray_is_sent_as_radiomics_reference_with_its_scale(vocabulary, tmp_path):
    info = _info(sobel=0.5, canny=0.25)
    panel = planning.PanelSettings(variations=2, use_reference=True, reference_control="canny")
    plan = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info, panel, tmp_path, reference=_xray())
    for job in plan.jobs:
        ((name, path, scale),) = job.files.controls
        assert (name, path.name, scale) == ("canny", "reference.nrrd", 0.25)  # the model's default scale
        assert path.parent == job.result_dir.parent and job.files.control_stages == "both"
        pixels = _read(path)
        assert pixels.dtype == np.float32 and pixels.min() == 0.0 and pixels.max() == 1.0
        assert np.allclose(pixels, (_xray()[0] - 1000.0) / (3.0 * 63 + 200.0))
    # both ends of the engine's range are accepted, outside it the engine's own sentence
    for scale in CONTROL_SCALE_RANGE:
        panel = planning.PanelSettings(use_reference=True, reference_scale=scale, control_stages="anatomy")
        job = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info, panel, tmp_path / str(scale),
                                 reference=_xray()).jobs[0]
        assert job.files.controls[0][0::2] == ("sobel", scale) and job.files.control_stages == "anatomy"
    for scale in (-0.01, 2.01):
        with pytest.raises(InputError, match=r"The sobel scale .* is outside \[0, 2\]"):
            planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info,
                               planning.PanelSettings(use_reference=True, reference_scale=scale), tmp_path / "x",
                               reference=_xray())
    # no reference, nothing sent; no controls, no stages either
    job = planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info, planning.PanelSettings(),
                             tmp_path / "none", reference=_xray()).jobs[0]
    assert job.files.controls == [] and job.files.control_stages is None
    assert not (job.result_dir.parent / "reference.nrrd").exists()


@pytest.mark.parametrize("info, panel, reference, message", [
    (_info(attention=1.0), dict(use_reference=True), _xray(), "This model has no radiomics ControlNet"),
    (_info(sobel=1.0), dict(use_reference=True, reference_control="texture"), _xray(),
     "This model has no texture ControlNet; it has sobel"),
    (_info(sobel=1.0), dict(use_reference=True), np.zeros((1, SIZE, SIZE)), "The canvas is blank"),
    (_info(sobel=1.0), dict(use_reference=True), None, "Select the X-ray"),
    (_info(sobel=1.0), dict(use_reference=True, control_stages="decoder"), _xray(), "control stages"),
])
def test_a_reference_that_cannot_be_used_is_one_sentence(vocabulary, tmp_path, info, panel, reference, message):
    with pytest.raises(InputError, match=message):
        planning.plan_jobs(_segments(vocabulary), CANVAS, vocabulary, info, planning.PanelSettings(**panel),
                           tmp_path, reference=reference)
    assert not list(tmp_path.rglob("*.nrrd"))  # refused before anything is written


def test_the_painted_attention_is_sent_as_a_mask_the_engine_blurs(vocabulary, tmp_path):
    region = _disc((20, 20), 5)
    plan = planning.plan_jobs(_segments(vocabulary, region), CANVAS, vocabulary, _info(attention=0.75),
                              planning.PanelSettings(), tmp_path)
    ((name, path, scale),) = plan.jobs[0].files.controls
    assert (name, path.name, scale) == ("attention", "attention.nrrd", 0.75)
    sent = _read(path)
    assert sent.dtype == np.uint8 and np.array_equal(sent, region[0])  # two levels: the engine's region rule
    # the engine reads it as the painted region and blurs it with its one rule
    from xreal_engine.io.controls import attention_from_region, load_control, parse_control

    loaded = load_control(parse_control(f"attention:{path}:{scale}"), size=SIZE, input_shape=(SIZE, SIZE))
    assert np.allclose(loaded.map, attention_from_region(region[0] > 0), atol=1e-6) and not loaded.warnings
    # a model without an attention ControlNet, and a region that covers everything, are refused
    with pytest.raises(InputError, match="no attention ControlNet"):
        planning.plan_jobs(_segments(vocabulary, region), CANVAS, vocabulary, _info(sobel=1.0),
                           planning.PanelSettings(), tmp_path / "no")
    with pytest.raises(InputError, match="covers the whole image"):
        planning.plan_jobs(_segments(vocabulary, np.ones((1, SIZE, SIZE), np.uint8)), CANVAS, vocabulary,
                           _info(attention=1.0), planning.PanelSettings(), tmp_path / "all")


def test_controls_reach_the_engine_and_the_results_show_them(vocabulary, tmp_path):
    client = ReplayEngineClient(polls=1, info=_info(sobel=0.5, attention=1.0))
    panel = planning.PanelSettings(use_reference=True, reference_scale=0.4, attention_scale=1.5,
                                   control_stages="pathology")
    plan = planning.plan_jobs(_segments(vocabulary, _disc((20, 20), 5)), CANVAS, vocabulary, client.info(), panel,
                              tmp_path, reference=_xray())
    runner = JobRunner(client, poll_interval=0.01)
    runner.start(plan.jobs)
    assert runner.wait(60) and runner.drain()[-1].state == DONE
    (sent,) = client.submitted
    assert sent["controls"] == [("sobel", "reference.nrrd", 0.4), ("attention", "attention.nrrd", 1.5)]
    assert sent["control_stages"] == "pathology"
    # a result made with controls (its provenance, as the engine writes it) shows them, and Generate again
    # takes them back into the panel
    provenance = {"seed": 3, "control_stages": "pathology", "controls": [  # as generate.py writes it
        {"name": "sobel", "source": "control-1.nrrd", "source_sha256": "ab" * 32, "scale": 0.4,
         "stages": "pathology"},
        {"name": "attention", "source": "control-2.nrrd", "source_sha256": "cd" * 32, "scale": 1.5,
         "stages": "pathology"}]}
    assert results.provenance_summary(provenance) == "seed 3 · controls sobel 0.4, attention 1.5"
    # without the top-level setting, the stages the controls steered say it
    del provenance["control_stages"]
    assert results.control_stages_of(provenance) == "pathology"
    both = {"controls": [{"name": "sobel", "scale": 1.0, "stages": ["anatomy", "pathology"]}]}  # a list form too
    assert results.control_stages_of(both) == "both" and results.control_stages_of({}) is None
    assert results.control_stages_of({"controls": [{"name": "sobel", "scale": 1.0, "stages": "anatomy"}]}) == "anatomy"
    settings = results.settings_from_provenance(provenance)
    assert {k: settings[k] for k in ("useReference", "referenceControl", "referenceScale", "attentionScale",
                                     "controlStages")} == {
        "useReference": True, "referenceControl": "sobel", "referenceScale": 0.4, "attentionScale": 1.5,
        "controlStages": "pathology"}
    assert results.settings_from_provenance({"seed": 3, "controls": []})["useReference"] is False
    assert "useReference" not in results.settings_from_provenance({"seed": 3})  # an engine without controls
    assert results.provenance_summary({"controls": [{"name": "sobel", "scale": "x"}, "odd"]}) == ""
