"""MedQM's shipped stand-in diagnostic model (``medqm-vlm-demo``): the labeller's own model, and how it is made.

No multimodal LLM's weights can be obtained offline, yet `medqm label` must run on a fresh machine; so MedQM
ships a small LLaVA-style model trained on CPU on the demo collection's diagnostic questions
(`medqm.label.tasks.demo_questions`) and on synthetic lesions inserted into its real backgrounds
(`medqm.synth.make_lesion_set`); optionally (``--br35h data/br35h``) also on the Br35H brain-tumour MR collection
with its tumour question (``QUESTION_TEMPLATES["tumour"]``, answer type ``tumour``), split by near-duplicate
cluster and measured by balanced accuracy, AUC and expected calibration error on held-out clusters. It is an
ordinary Hugging Face folder — config, safetensors, tokenizer, processor and chat template — that
`medqm.label.hf.load_model` loads like any real MLLM, through ``AutoModelForImageTextToText`` /
``AutoProcessor`` with no custom code.

This package holds all of it; ``scripts/train_diagnostic_vlm.py`` is only its command line:

- `model`: the architecture (`DEMO_VLM_ARCH`, `build_demo_vlm`), its tokenizer, saving in half precision
  (`save_demo_vlm`);
- `split`: the case-level split (`case_split`);
- `data`: the training data (demo questions plus a cached synthetic lesion set, optionally Br35H) and lesion masks;
- `augment`, `features`, `training`: augmentation and sampling, the training-time inputs and frozen-tower
  features, the training loop (`TrainConfig`, `train`);
- `scoring`, `evaluation`: closed-set scoring through the generic backend (`closed_set_scores`,
  `accuracy_table`), the held-out evaluation (accuracy, calibration, the tumour question's balanced accuracy and
  AUC), the subset the shipped-model test re-scores, the reaction check;
- `card`: the model card, ``MODEL_CARD.md`` in the folder, which states what it was trained on and how well it
  does; it is a stand-in for the pipeline's sake, not a diagnostic tool.

Only `model`, `split` and `scoring` are imported here (light: torch and transformers load on first use); the
training modules are imported by name (``from medqm.label.standin.training import train``).

Architecture: transformers' FastVLM class (``FastVlmForConditionalGeneration``; Vasu et al., "FastVLM",
CVPR 2025), which is the LLaVA-1.5 layout (Liu et al., CVPR 2024) — vision tower, two-layer MLP projector,
decoder — with a convolutional vision tower through ``TimmWrapperModel``. The tower is timm's
``tf_efficientnet_lite0`` with its ImageNet weights (the one pretrained image network installable offline),
run at output stride 16 (the last two stages dilated) so that a 256-px image gives 16 × 16 = 256 image
tokens of 1280 features; it stays frozen in training, as LLaVA's CLIP tower does. The decoder is a small
Llama trained from scratch with a byte-level BPE tokenizer trained on the question/answer text and the
llava-hf chat template (``USER: <image>\\n... ASSISTANT:``), the tokenizer's ``</s>`` ending each answer.
Images are resized to 256 × 256 without cropping, so a lesion's image quadrant is kept.
"""

from medqm._fs import file_sha256

from .model import (
    CHAT_TEMPLATE,
    DEMO_VLM_ARCH,
    DEMO_VLM_DIR,
    build_demo_vlm,
    folder_size,
    save_demo_vlm,
    tokenizer_corpus,
)
from .scoring import accuracy_table, closed_set_scores, reaction_images
from .split import case_split

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_VLM_ARCH",
    "DEMO_VLM_DIR",
    "accuracy_table",
    "build_demo_vlm",
    "case_split",
    "closed_set_scores",
    "file_sha256",
    "folder_size",
    "reaction_images",
    "save_demo_vlm",
    "tokenizer_corpus",
]
