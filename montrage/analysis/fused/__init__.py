"""The fused attribution model behind ``montrage``: every channel the run records, combined per query kind.

Channels of a (query j, training image i) pair, each standardised per query across training images
(z-score over i, so channels of any unit can be added):

* ``rep/<condition>/<group>``: the training-dynamics channels (:mod:`montrage.analysis.kernel`) averaged
  per group -- ``sim-final`` (the attributed checkpoint), ``sim-path`` (earlier checkpoints), ``move``
  (co-movement), ``loss`` (loss co-descent) -- under the null prompt, and, when the query has a prompt,
  also under its prompt (the store's ``caption`` condition);
* ``grad/dtrak``: D-TRAK at the attributed checkpoint; ``grad/tracin/k<k>``: per-timestep normalised
  gradient dot products of the training loss at each checkpoint k (TracIn's terms, unweighted: the model
  learns their weights). Training-side gradients are the features stored with the run
  (:mod:`montrage.analysis.gradient_features`); query gradients are taken under the query's prompt, or the
  null prompt when the query is an image only;
* ``pixel``: cosine of centred pixels; ``dup/pixel``: a near-duplicate ratio test (distance to the nearest
  training image over the second nearest), kept on its own scale: it separates copies from generations,
  which a per-query z-score of ``pixel`` cannot when siblings share a palette;
* ``dyn/learned``: the learned per-module/timestep dynamics score (``montrage-dynamics``), which the group
  means of ``rep/*`` average away;
* ``text/encoder`` (prompt known): prompt vs training caption through the run's own text encoder, the path by
  which the prompt conditions the UNet; ``text/concept``: its mean over each concept's images (the prompt's pull
  towards a concept as a whole, which is what a new composition's concept word carries). Word matching (TF-IDF)
  is never a channel: it is the ``text-only`` baseline that ``montrage`` is reported against;
* ``steps/learned``: how much of each image the LoRA learned, from the per-step losses the loop recorded
  (a per-image prior; only when the run recorded per-step signals);
* ``class/concept`` (image only): the query's log-probability of each image's concept under a small CNN trained on
  the run's own training images and concept labels (:mod:`montrage.analysis.concept_classifier`; cross-fitted on
  the fit's supervision rows): a concept's style apart from any one image's object.

score_raw(j, i) = sum_c w_c z_c(j, i) with w_c >= 0, score = sigmoid(a (score_raw - b)), fitted with the
attribution loss (:mod:`montrage.losses.attribution`) SEPARATELY for the two query kinds: ``prompt``
(``QuerySet.prompts[j] != ''``) and ``image`` (no prompt). Supervision, no extra labels: the run's anchor
training images, *perturbed* at two strengths (a shift of 1/32 of the side, colour jitter, pixel noise: image-only
kind; and near-copies: both kinds; exact copies would make pixels look perfect), plus the run's own generations of
the anchors' captions at the attributed checkpoint (fresh seeds), scored as queries -- each kind is fitted on
the queries of that kind users bring -- target 1 for the source image,
0.5 for its concept's other images, 0 otherwise; the image-only kind adds the concept term once more with each
row's own image left out (an image-only query may show a concept on an object no training image shows). When the
run's model cannot be loaded (e.g. a synthetic store), the stored
anchor trajectories (a second noise draw, no perturbation) supervise the representation channels alone.
Channels that cannot be computed for a run (no LoRA weights, no training images) are left out, and the
JSON of ``montrage attribute`` lists per query the channels and weights used. Under the ``checkpoint_channels_only``
option (set by ``montrage compare``) the fit leaves out the families whose values are the same at every checkpoint
(pixel, text, class): "when did generations start to look like the concept" is asked of each checkpoint's model,
and those channels would credit the base model's generations at step 0.

Exact caption first (prompt known): training images whose caption IS the prompt (cosine 1 through the run's text
encoder, fewer than all images) are ranked above every other image, each just above the best of the rest; the
rest of the ranking and the scores' scale are untouched. Such an image was trained under exactly the
conditioning that made the generation -- the most direct path of influence a prompt has -- but the channels'
weighted sum can let a sibling of the same concept (or a hub image) outscore it. Rank-only, so the graded scores
the LDS reads stay as fitted. The fit adopts the rule only if it does not lower R@1 on its generated supervision
(the anchors' own captions), and the JSON lists per query the images it lifted. On such a query the other images'
scores are then multiplied by a share (``others_share``): chosen held out on the counterfactual targets when the run
has retrains (:func:`exact_caption_share`), else by the memorisation test (:func:`memorised_share`: 0 when most of
the run's generations of training captions reproduce their image, 1 otherwise).

Channel set (``montrage``): every channel, or the attributed checkpoint's only, chosen per run and query kind by the
held-out value of the fit's objective on the anchors (:func:`choose_channel_set`). ``montrage-final`` is the same
model always restricted to the attributed checkpoint (``rep/*/sim-final``, ``grad/dtrak``, ``grad/tracin/k<last>``,
``pixel``, text) and ``montrage-all`` always with every channel: the dynamics ablation. On the attributed
checkpoint's channels a prompt-known query costs one UNet forward per (image, timestep) item and two backward
passes: its caption-condition representations, D-TRAK's and TracIn's gradients share that forward
(:func:`shared_prompt_pass`), and the null prompt's representations take a second forward without gradients. On
every channel a query's representations at checkpoints 1..k under its gradients' condition (null prompt when image
only) come from the forwards of TracIn's batched gradient pass (:func:`shared_trajectory_pass`; an image-only extra
query 0.76 -> 0.57 s on the 56-image typeface run, same scores). Concept
queries
(``--concept PHRASE``): score(prompt with the phrase) - score(prompt without it), Concept-TRAK's utility
direction, answered by the same fitted model.

Modules, each importing only those before it: :mod:`.kinds` (query kinds, channel names) <- :mod:`.fit` (the model,
its fit and the channel-set choice: arrays in, a model out) <- :mod:`.rules` (what the fit adopts only on its own
evidence); :mod:`.kinds` <- :mod:`.channels` (channel values computed from the run) <- :mod:`.supervision` (the fit's
rows, made from the run itself); :mod:`.scorer` on top (a model per query kind: loaded, or fitted and saved).
"""
from montrage.analysis.fused.fit import CHANNEL_SET_LABELS, FusedModel
from montrage.analysis.fused.kinds import CHECKPOINT_ONLY_OPTION, IMAGE, PROMPT
from montrage.analysis.fused.rules import lds_per_query
from montrage.analysis.fused.scorer import FusedScorer, fitted_model  # registers the scorers
from montrage.analysis.fused.supervision import supervision_anchors, supervision_generations

__all__ = ["CHANNEL_SET_LABELS", "CHECKPOINT_ONLY_OPTION", "FusedModel", "FusedScorer", "IMAGE", "PROMPT",
           "fitted_model", "lds_per_query", "supervision_anchors", "supervision_generations"]
