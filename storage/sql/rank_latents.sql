-- rank_latents.sql: the `latents` table: statistics, every score and its rank, one row per latent that fires.
-- Run by storage/ranking.py rank_latents(); placeholders {{...}} are relations or SQL files it inlines, $names are
-- query parameters:
--   {{latent_docs}} the latent_docs table (or latent_docs.sql over latent_tokens); {{dominant}} dominant_behaviour.sql
--   or an empty query; {{latent_dirs}} (latent_id, promoted, suppressed) or an empty relation; {{rank_by}} a score
--   name, validated in Python;
--   $n_tokens analysed tokens (frequency denominator); $min_support firing tokens needed by score_mean;
--   $top_n documents kept by score_concentration; $top_m (<= $top_n) documents averaged by score_top_docs.
-- With S_d = the latent's attribution summed over document d, s_d = max(S_d, 0), P = sum_d s_d (pos_mass):
--   score_total         sum of attribution over firing tokens                        (= kl_attr_sum)
--   score_mean          attribution per firing token; NULL under $min_support tokens  (= kl_attr_mean)
--   score_peak_token    largest attribution on one token                             (= kl_attr_max)
--   score_peak_doc      max_d S_d
--   score_concentration (sum of the $top_n largest s_d)^2 / P = share of P in the top documents x their mass
--   score_top_docs      mean of the $top_m largest s_d, missing documents count 0 (a one-document spike gets 1/m)
--   score_focus         exp(sum_d (s_d/P) ln s_d): the mass-weighted geometric mean of s_d, = P / exp(H) where H is
--                       the entropy of the document shares s_d/P (exp(H) = effective number of documents)
-- Every rank_<score> is 1 for the best latent, NULL scores last, ties by latent_id; `rank` = rank_{{rank_by}}.
-- Cost: one aggregation over the (latent, document) rows of latent_docs, which the attribution stage writes
-- (every statistic and score derives from them), 7 window ranks over the latents (see bench/rank.py).
WITH per_latent AS (
    SELECT
        latent_id,
        sum(n_tokens)::BIGINT AS n_active,
        sum(act_sum) / sum(n_tokens) AS mean_activation,
        max(act_max)::DOUBLE AS max_activation,
        sum(attr_sum) AS kl_attr_sum,
        max(attr_max)::DOUBLE AS kl_attr_max,
        count(*) AS n_docs,
        max(attr_sum) AS peak_doc,
        sum(greatest(attr_sum, 0)) AS pos_mass,
        sum(CASE WHEN attr_sum > 0 THEN attr_sum * ln(attr_sum) ELSE 0 END) AS pos_xlogx,
        max(greatest(attr_sum, 0), $top_n) AS top_docs_desc
    FROM {{latent_docs}}
    GROUP BY latent_id
),
scored AS (
    SELECT
        latent_id,
        n_active,
        n_docs,
        n_active / $n_tokens::DOUBLE AS frequency,
        mean_activation,
        max_activation,
        kl_attr_sum,
        kl_attr_sum / n_active AS kl_attr_mean,
        kl_attr_max,
        pos_mass,
        kl_attr_sum AS score_total,
        CASE WHEN n_active >= $min_support THEN kl_attr_sum / n_active END AS score_mean,
        kl_attr_max AS score_peak_token,
        peak_doc AS score_peak_doc,
        CASE WHEN pos_mass > 0 THEN list_sum(top_docs_desc) ^ 2 / pos_mass ELSE 0 END AS score_concentration,
        coalesce(list_sum(top_docs_desc[1:$top_m]), 0) / $top_m AS score_top_docs,
        CASE WHEN pos_mass > 0 THEN exp(pos_xlogx / pos_mass) ELSE 0 END AS score_focus
    FROM per_latent
),
ranked AS (
    SELECT
        *,
        row_number() OVER (ORDER BY score_total DESC NULLS LAST, latent_id) AS rank_total,
        row_number() OVER (ORDER BY score_mean DESC NULLS LAST, latent_id) AS rank_mean,
        row_number() OVER (ORDER BY score_peak_token DESC NULLS LAST, latent_id) AS rank_peak_token,
        row_number() OVER (ORDER BY score_peak_doc DESC NULLS LAST, latent_id) AS rank_peak_doc,
        row_number() OVER (ORDER BY score_concentration DESC NULLS LAST, latent_id) AS rank_concentration,
        row_number() OVER (ORDER BY score_top_docs DESC NULLS LAST, latent_id) AS rank_top_docs,
        row_number() OVER (ORDER BY score_focus DESC NULLS LAST, latent_id) AS rank_focus
    FROM scored
)
SELECT
    r.*,
    r.rank_{{rank_by}} AS rank,
    dom.dominant_behaviour,
    dom.dominant_share,
    dirs.promoted,
    dirs.suppressed
FROM ranked AS r
LEFT JOIN ({{dominant}}) AS dom ON dom.latent_id = r.latent_id
LEFT JOIN {{latent_dirs}} AS dirs ON dirs.latent_id = r.latent_id
ORDER BY rank
