"""The built-in methods: name, summary, budget presets and capabilities, declared without importing torch.

This is the one place a built-in method is registered; its config class and fit function live in its own
module (``methods/<name>.py``) and are named here by dotted path, so `erasekit methods` answers at once.
"""

from __future__ import annotations

from erasekit.methods.specs import ALL_FAMILIES, declare_method

# ESD family (Gandikota et al. 2023); toy: the 3 M-parameter toy model needs a larger lr than the paper's 1e-5
ESD_TOY = {"iterations": 150, "lr": 1e-3, "ddim_steps": 25}
ESD_FAST = {"iterations": 300}
ESD_TINY = {"iterations": 2, "lr": 1e-3, "ddim_steps": 3}  # a few steps on a tiny random model of any family (tests)
# toy: every non-cross-attention weight at lr 1e-3 collapsed the model (PSR-1 8 %); seed 0, 8 images/class: lr 1e-4 ESR-1 62 % /
# PSR-1 92 %, 2e-4 100 % / 65 %, 3e-4 100 % / 35 %
ESDU_TOY = {**ESD_TOY, "lr": 2e-4}

EAP_TOY = {"iterations": 150, "lr": 1e-3, "ddim_steps": 25, "k": 40, "n_centres": 12, "gumbel_lr": 5e-2}
EAP_FAST = {"iterations": 300, "rollout_reuse": 4}
EAP_TINY = {"iterations": 2, "lr": 1e-3, "ddim_steps": 3, "concept_space": "toy", "k": 8, "n_centres": 3}  # tests, any family

AGE_TOY = {"iterations": 250, "lr": 1e-3, "ddim_steps": 25, "k": 40, "n_centres": 40, "gumbel_lr": 5e-2}
AGE_FAST = {"iterations": 300, "rollout_reuse": 4}
AGE_TINY = {"iterations": 2, "lr": 1e-3, "ddim_steps": 3, "concept_space": "toy", "k": 8, "n_centres": 8}  # tests, any family

TRAINED = {"families": ALL_FAMILIES, "checkpointable": True, "lora": True, "distributed": True}

declare_method("eap", "EAP: ESD erasure while preserving the adversarially chosen most-sensitive concept (Gumbel-Softmax).",
               "erasekit.methods.eap:EAPConfig", "erasekit.methods.eap:fit_eap", {"toy": EAP_TOY, "fast": EAP_FAST, "tiny": EAP_TINY}, **TRAINED)
declare_method("eap-pgd", "EAP with a continuous PGD search of the adversarial embedding.",
               "erasekit.methods.eap:EAPPGDConfig", "erasekit.methods.eap:fit_eap_pgd",
               {"toy": {**EAP_TOY, "pgd_lr": 1e-2}, "fast": EAP_FAST, "tiny": EAP_TINY}, **TRAINED)
declare_method("esd-x", "ESD on cross-attention: negative guidance away from the concept (objects, styles).",
               "erasekit.methods.esd:ESDXConfig", "erasekit.methods.esd:fit_esd_x", {"toy": ESD_TOY, "fast": ESD_FAST, "tiny": ESD_TINY}, **TRAINED)
declare_method("esd-u", "ESD on all non-cross-attention layers (unconditional erasure, e.g. nudity).",
               "erasekit.methods.esd:ESDUConfig", "erasekit.methods.esd:fit_esd_u", {"toy": ESDU_TOY, "fast": ESD_FAST, "tiny": ESD_TINY}, **TRAINED)
declare_method("age", "AGE: ESD toward an adaptively chosen anchor concept that is also preserved (EAP follow-up).",
               "erasekit.methods.age:AGEConfig", "erasekit.methods.age:fit_age", {"toy": AGE_TOY, "fast": AGE_FAST, "tiny": AGE_TINY},
               families=ALL_FAMILIES, lora=True, checkpointable=True)
declare_method(
    "ca", "CA (Ablating Concepts): fine-tune the target's prediction onto an anchor concept's, on the model's own anchor images.",
    "erasekit.methods.ca:CAConfig", "erasekit.methods.ca:fit_ca",
    # toy: CA's erasure is a cliff in lr on the toy world (seed 0, 8 images/class: lr 2e-5 ESR-1 6 %, 3e-5 75 %, 4e-5 100 % at
    # PSR-1 42 %, 1e-4 100 % at 17 %); 4e-5 is the smallest that erases, 20x the paper's 2e-6 for a 3 M-parameter model
    {"toy": {"lr": 4e-5, "anchor_images": 64, "ddim_steps": 20, "iterations": 150}, "fast": {"anchor_images": 64, "ddim_steps": 25},
     "tiny": {"iterations": 2, "anchor_images": 2, "ddim_steps": 3, "batch_size": 2, "lr": 1e-3}},
    families=ALL_FAMILIES, checkpointable=True,
)
declare_method(
    "uce", "UCE: closed-form edit of cross-attention keys/values (SD3/FLUX.1: the text embedder) mapping the concept to a guide (seconds, no training).",
    "erasekit.methods.uce:UCEConfig", "erasekit.methods.uce:fit_uce",
    # toy: the 2-layer toy CLIP carries the object in the EOS/padding rows after the word, which last-token keys miss
    # (ESR-1 0 %); the old code's rows through EOS, with '' retained, erase it (ESR-1 100 %, PSR-1 83 % on 8 images/class)
    {"toy": {"key_rows": "through-eos", "retain_empty": True}, "fast": {}, "old-code": {"key_rows": "through-eos", "retain_empty": True, "preserve_scale": -1.0},
     "tiny": {}},
    kind="closed-form", families=ALL_FAMILIES,
)
declare_method(
    "rece", "RECE: UCE, then closed-form rounds that also erase the embedding that still regenerates the concept.",
    "erasekit.methods.rece:RECEConfig", "erasekit.methods.rece:fit_rece",
    {"toy": {}, "fast": {}, "nudity": {"rounds": 3, "reg_scale": 0.1}, "art": {"concept_type": "art", "start_preserve_scale": 0.1}, "tiny": {"rounds": 1}},
    kind="closed-form", families=ALL_FAMILIES,
)
# toy (circle, 8 circle + 3 images of each other object): the paper's recipe (8 features switched off at two thirds of the
# depth, here layer 0 of 2) left ESR-1 at 12 % (the 2-layer toy encoder carries the object in many features). At the last
# layer, seed 0: 64 features firing on <= 20 % of other tokens erase 75 % at scale 0, 100 % at -0.5, but seed 2's SAE needs
# 128 features under 30 % (64 at scale -1.5: 12 %); 128 / 0.3 / -0.5 erases 100 % on seeds 0-2 at PSR-1 100 %. Detector
# features firing on <= 0.5 % of other tokens classify the ten "an image of a X" prompts right on seeds 0-2 (2 %: seed 1
# flags "diamond" too)
ITD_TOY = {"corpus": "toy", "layer": 1, "n_features": 128, "max_general_rate": 0.3, "scale": -0.5}
declare_method(
    "itd", "ItD: a sparse autoencoder on a text-encoder layer; the concept's features are switched off at inference (no weight changes).",
    "erasekit.methods.itd:ItDConfig", "erasekit.methods.itd:fit_itd",
    {"toy": ITD_TOY, "fast": {"sae_steps": 1000},
     "tiny": {"corpus": "toy", "corpus_size": 64, "sae_steps": 5, "sae_batch": 64, "expansion": 2, "k": 4, "n_features": 2, "threshold": 0.0}},
    kind="inference-time", families=("sd",),
)
# toy (circle, seed 0, 8 circle + 3 images of each other object): the paper's retain weight 0.3 erased at PSR-1 52-59 % (lr 1e-4 to
# 1e-3); weight 2 at lr 3e-4: ESR-1 100 / PSR-1 81; weight 3: 88 / 85 (lr 3e-4), 100 / 30 (lr 5e-4); attention only: 100 / 37
ADVUNLEARN_TOY = {"iterations": 150, "lr": 3e-4, "retain_weight": 2.0, "ddim_steps": 25, "warmup": 30, "attack_steps": 5, "attack_lr": 1e-2,
                  "retain_prompts": "toy"}
# toy: the paper's last layer does not reach ESR-1 90 (lr 1e-4 to 7e-4: 12-50 % at PSR-1 93-100; 1e-3 turns every prompt into
# circles); every layer at lr 3e-4 does (100 %) at PSR-1 48 % (2e-4: 62 / 85)
FEWSHOT_TOY = {"n_images": 8, "epochs": 4, "lr": 3e-4, "te_layers": "all", "ddim_steps": 25}
declare_method(
    "advunlearn", "AdvUnlearn: adversarial training of the text encoder (PGD prefix attack inside, ESD erasure + retain loss outside).",
    "erasekit.methods.advunlearn:AdvUnlearnConfig", "erasekit.methods.advunlearn:fit_advunlearn",
    {"toy": ADVUNLEARN_TOY,
     "fast": {"attack": "fast-at"},
     "tiny": {"iterations": 2, "lr": 1e-3, "ddim_steps": 3, "warmup": 1, "attack_steps": 2, "retain_batch": 2}},
    kind="text-encoder", families=("sd",), checkpointable=True,
)
declare_method(
    "fewshot-te", "Few-shot unlearning: gradient ascent on the denoising loss of a few concept images, through the text encoder's last layer.",
    "erasekit.methods.fewshot_te:FewShotTEConfig", "erasekit.methods.fewshot_te:fit_fewshot_te",
    {"toy": FEWSHOT_TOY, "fast": {},
     "tiny": {"n_images": 2, "epochs": 1, "ddim_steps": 3, "lr": 1e-3}},
    kind="text-encoder", families=("sd",), checkpointable=True,
)
# toy (circle, seed 0, 8 circle + 3 images of each other object), ESD's toy sizes: into '' (the target's guidance removed, its
# prompt sampled as the unconditional model, which draws a circle 6 times in 64) ESR-1 75 % / PSR-1 93 %; lr 3e-4: 38 / 100;
# lr 2e-3: 62 / 74; noxattn at 2e-4: 38 / 100; into 'square': 100 / 96 (every circle drawn as a square)
ALL_BUT_ONE_TOY = {**ESD_TOY, "into": "square"}
declare_method(
    "all-but-one", "All-but-One: the target's guidance term trained onto another concept's (--into; default none), the unconditional score held still.",
    "erasekit.methods.all_but_one:AllButOneConfig", "erasekit.methods.all_but_one:fit_all_but_one",
    {"toy": ALL_BUT_ONE_TOY, "fast": ESD_FAST, "tiny": ESD_TINY}, **TRAINED,
)
# toy (circle, seed 0, 8 circle + 3 images of each other object; 8 synonym images): the toy CLIP's token embeddings put
# disc 0.68, round 0.51, loop 0.44, disk 0.41 from circle and the other objects below 0.25, untrained vocabulary words near
# 0; a band down to 0.35 (radius 3) holds the synonyms' region, the toy world's words below it are kept. The first defaults
# (radius 0.6, band 0.85-0.99, perturbations past the bound kept) turned every prompt into circles (PSR-1 0 %): those
# perturbations still draw circle or ring. This preset: ESR-1 100 / PSR-1 100, synonyms erased 75 %; its closed form alone 38 / 100 / 75
REALERA_TOY = {**ESD_TOY, "beyond": "toy", "retain_prompts": "toy", "radius": 3.0, "band_low": 0.35, "band_high": 0.99}
declare_method(
    "realera", "RealEra: mine the concept's neighbour embeddings, erase them with it (closed form + fine-tuning), keep the words just beyond.",
    "erasekit.methods.realera:RealEraConfig", "erasekit.methods.realera:fit_realera",
    {"toy": REALERA_TOY, "fast": ESD_FAST, "tiny": {**ESD_TINY, "n_mined": 2, "n_beyond": 2}},
    families=("sd",), checkpointable=True,
)
# toy (circle, seed 0; 8 circle + 3 images of each other object): the paper's loss (the word's tokens, inside the mask)
# left circles drawn: ESR-1 12 % at its settings, 0 % at 200 steps lr 1e-3; adding the tokens after the word (which the
# causal encoder fills with it) reached 50-75 % over seeds 0-2 at 50 steps lr 1e-3 and fell back to 12 % / 0 % with more
# steps or lr 3e-3; the loss over the whole image (masks unused) with those tokens, 150 steps lr 1e-3: 100 % / PSR-1 100 %
# on seeds 0, 1 and 2 (the word's tokens alone: 88 %)
MACE_TOY = {"retain_prompts": "toy", "tokens": "word+after", "region": "image", "lr": 1e-3, "iterations": 150}
declare_method(
    "mace", "MACE: closed-form refinement, one attention-map LoRA per concept on masked images, closed-form fusion (many concepts at once).",
    "erasekit.methods.mace:MACEConfig", "erasekit.methods.mace:fit_mace",
    {"toy": MACE_TOY, "fast": {},
     "tiny": {"iterations": 2, "n_images": 2, "batch_size": 1, "retain_prompts": "toy", "lr": 1e-3, "images": "toy"}},
    families=("sd",),
)
# toy (circle, seed 0, 8 circle + 3 images of each other object): the paper's anchoring weight 1,000 held the adapter still
# (lr 1e-3: ESR-1 12 %, lr 5e-3: 0 %); weight 1 or 20 at lr 5e-3: ESR-1 100 %, PSR-1 100 % with transport on and off
SPM_TOY = {"iterations": 150, "lr": 5e-3, "ddim_steps": 25, "anchors": "toy", "preserve_weight": 20.0}
declare_method(
    "spm", "SPM: a rank-1 adapter on every UNet layer (ESD erasure + latent anchoring), gated per prompt at inference (facilitated transport).",
    "erasekit.methods.spm:SPMConfig", "erasekit.methods.spm:fit_spm",
    {"toy": SPM_TOY, "fast": {"iterations": 1000},
     "tiny": {"iterations": 2, "lr": 1e-3, "ddim_steps": 3, "n_anchors": 4}},
    kind="inference-time", families=("sd",), checkpointable=True, lora=True,
)
GEOM_TOY = {"n_images": 256, "iterations": 200, "lr": 1e-4, "batch_size": 8}
declare_method(
    "geom-erasing", "Geom-Erasing: captions name where a detector finds the implicit concept; fine-tune, then those places are the negative prompt.",
    "erasekit.methods.geom_erasing:GeomErasingConfig", "erasekit.methods.geom_erasing:fit_geom_erasing",
    {"toy": GEOM_TOY, "fast": {}, "tiny": {"n_images": 4, "iterations": 2, "batch_size": 2, "lr": 1e-3}},
    families=("sd",), checkpointable=True, lora=True,
)
# toy (circle, seed 0, 4 images/class), CA's toy data (64 anchor images, 20 sampler steps), 100 warm-up + 200 game steps:
# lr 4e-5 ESR-1 75 / PSR-1 97; 6e-5 100 / 83; 8e-5 100 / 83 (the discriminator then wins: loss 0.93 against 1.39 at chance)
# but over seeds 0-2 at 8 images/class this preset erased 75 % on each seed (compare, session 13): still to tune to >= 90
# session 15, seeds 0-2, 8 images/class, ESR-1 per seed: 400 iterations 12.5/25/87.5; lr 8e-5 87.5/75/75; disc_lr 5e-4
# 37.5/75/25; lr 1.5e-4 37.5/100/0 (PSR-1 49.5): longer or stronger games erase less here.
# session 17, an object anchor as the paper uses (airplane for parachute; seed 0, 16 images/class, ESR-1 / PSR-1): the
# empty prompt 81.2 / 87.5 (500 iterations 68.8 / 98.6; lr 1e-4 81.2 / 84.7); square 100 / 68.1, with lr 3e-5 100 / 78.5,
# 200 iterations 100 / 70.1. The preset: square (`toy`: triangle where square or diamond is erased), lr 3e-5; seeds 0-2:
# ESR-1 100 [92.6, 100], PSR-1 77.1 [72.9, 80.8] (circle's look-alike ring takes most of the cost)
DOCO_TOY = {"iterations": 300, "warm_up": 100, "lr": 3e-5, "batch_size": 4, "anchor_images": 64, "ddim_steps": 20, "anchor": "toy"}
declare_method(
    "doco", "DoCo: a discriminator tells the target's x0 from the anchor's; cross-attention trained to fool it, with gradient surgery against a prior loss.",
    "erasekit.methods.doco:DoCoConfig", "erasekit.methods.doco:fit_doco",
    {"toy": DOCO_TOY, "fast": {"iterations": 600, "warm_up": 300, "anchor_images": 200},
     "tiny": {"iterations": 3, "warm_up": 1, "anchor_images": 2, "ddim_steps": 3, "batch_size": 2, "lr": 1e-3}},
    families=("sd", "sdxl", "sd3"), checkpointable=True,
)
TRCE_TINY = {"iterations": 2, "margin": 1.0, "seeds_per_prompt": 1, "ddim_steps": 3, "early_steps": 2, "reg_trajectories": 2, "reg_batch": 2, "templates": 2, "lr": 1e-3}
declare_method(
    "trce", "TRCE: closed-form edit mapping malicious prompts' end-of-text row to safe ones, then contrastive fine-tuning of the early steps.",
    "erasekit.methods.trce:TRCEConfig", "erasekit.methods.trce:fit_trce",
    {"toy": {"pairs": "toy", "retain": "toy", "templates": 6, "ddim_steps": 25, "early_steps": 13, "seeds_per_prompt": 2,
             "reg_trajectories": 64, "iterations": 200, "lr": 1e-5},
     "fast": {"reg_trajectories": 400}, "tiny": TRCE_TINY},
    families=("sd",), checkpointable=True,
)
# toy: ESD-x's toy stage 1 (150 steps at 1e-3 on cross-attention), then 40 image steps through the shipped toy adapter
# on 32 of the model's own images of the concept. Seed 0, circle (8 text images per object; 12 image-prompt generations):
# 100 image steps: text circle 0 %, other objects by text 73.6 %, circle from the image alone 0 %; 40 steps: 0 %, 84.7 %, 0 %
CO_ERASING_TOY = {"train_method": "xattn", "stage1_iterations": 150, "iterations": 40, "lr": 1e-3, "ddim_steps": 25, "image_count": 32}
declare_method(
    "co-erasing", "Co-Erasing: ESD's text erasure, then the same negative guidance with the concept's images as prompts (IP-Adapter).",
    "erasekit.methods.co_erasing:CoErasingConfig", "erasekit.methods.co_erasing:fit_co_erasing",
    {"toy": CO_ERASING_TOY, "fast": {"stage1_iterations": 300, "iterations": 300},
     "tiny": {"stage1_iterations": 2, "iterations": 2, "lr": 1e-3, "ddim_steps": 3, "image_count": 2, "image_steps": 2}},
    families=("sd",), checkpointable=True,
)
# -- the autoregressive family (erasekit.autoregressive: Janus) ---------------------------------------------------
EAR_TINY = {"iterations": 2, "lr": 1e-3, "window_size": 4, "threshold": 0.0}  # a few steps on a tiny random Janus (tests)
# toy (circle, seed 0, 16 images/class; `compare --variant`): the paper's lr 1e-4 erased partly (ESR-1 62.5 at 30
# iterations, 31.2 at 60); 3e-4 and 5e-4 at 30-100 iterations 50-69; train_method full/mlp less; 1e-3 100 at PSR-1 70.1;
# 7e-4 x 30 93.8 at PSR-1 84.7 (x 20: 75.0 / 92.4). Windows of a quarter of the 64 image tokens. The paper's threshold
# 0.05 masks nothing here: the toy Janus's per-position losses start at 3.7-156 (5-90th percentiles, circle).
EAR_TOY = {"iterations": 30, "lr": 7e-4, "window_size": 16}
declare_method(
    "ear", "EAR: ESD on an autoregressive (Janus) model's image-token logits; windowed accumulation, thresholded masking.",
    "erasekit.methods.ear:EARConfig", "erasekit.methods.ear:fit_ear", {"toy": EAR_TOY, "tiny": EAR_TINY}, families=("janus",), lora=True,
)
