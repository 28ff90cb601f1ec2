-- rank_latents.sql: the `latents` table: statistics, every score and its rank, one row per latent that fires.
-- Run by storage/ranking.py rank_latents(); placeholders {{...}} are relations or SQL files it inlines, $names are
-- query parameters:
--   {{latent_docs}} the (latent, document) relation of the ANALYSED tokens (the roles of `rank.roles`: the
--   latent_docs table when every token's role is analysed, else latent_docs.sql over those tokens);
--   {{latent_docs_all}} the same over every token (the latent_docs table); {{dominant}} dominant_behaviour.sql or
--   an empty query; {{latent_dirs}} (latent_id, promoted, suppressed) or an empty relation; {{rank_by}} a score
--   name, validated in Python;
--   $n_tokens analysed tokens (frequency denominator); $n_docs documents; $broad_docs the broad share (> 1: none);
--   $min_support firing tokens needed by score_mean;
--   $top_n documents kept by score_concentration; $top_m (<= $top_n) documents averaged by score_top_docs;
--   $rrf_k the rank offset of score_fusion.
-- Statistics and scores read the analysed tokens only. With S_d = the latent's attribution summed over document d,
-- s_d = max(S_d, 0), P = sum_d s_d (pos_mass):
--   score_total         sum of attribution over firing tokens                        (= kl_attr_sum)
--   score_mean          attribution per firing token; NULL under $min_support tokens  (= kl_attr_mean)
--   score_peak_token    largest attribution on one token                             (= kl_attr_max)
--   score_peak_doc      max_d S_d
--   score_concentration (sum of the $top_n largest s_d)^2 / P = share of P in the top documents x their mass
--   score_top_docs      mean of the $top_m largest s_d, missing documents count 0 (a one-document spike gets 1/m)
--   score_focus         exp(sum_d (s_d/P) ln s_d): the mass-weighted geometric mean of s_d, = P / exp(H) where H is
--                       the entropy of the document shares s_d/P (exp(H) = effective number of documents)
--   score_fusion        reciprocal rank fusion (Cormack, Clarke & Buettcher 2009) of three scores that fail
--                       differently: 1/($rrf_k + rank_mean) + 1/($rrf_k + rank_peak_token)
--                       + 1/($rrf_k + rank_concentration); a latent near the top of any one of them stays high
-- Narrow and broad (issue 15 part 4): doc_share = share of documents where the latent fires on analysed tokens,
-- doc_share_all = the same on any token. A latent is NARROW when it fires on analysed tokens and doc_share <
-- $broad_docs: only narrow latents get rank_<score> (1 for the best, NULL scores last, ties by latent_id) and
-- `rank` = rank_{{rank_by}}. It is BROAD when doc_share_all >= $broad_docs (a template or system-prompt change, a
-- global style): rank_broad orders those by positive attribution mass on any token (pos_mass_all). A latent can
-- be both (narrow on the analysed tokens, broad through the others) or neither (fires only on unanalysed tokens
-- of a few documents); every latent that fires anywhere has a row.
-- Cost: one aggregation over the (latent, document) rows (latent_docs, which the attribution stage writes; with a
-- role filter, latent_tokens joined to the analysed tokens first), 9 window ranks over the latents (bench/rank.py).
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
everywhere AS (
    SELECT latent_id, count(*) AS n_docs_all, sum(greatest(attr_sum, 0)) AS pos_mass_all
    FROM {{latent_docs_all}}
    GROUP BY latent_id
),
scored AS (
    SELECT
        e.latent_id,
        coalesce(n_active, 0) AS n_active,
        coalesce(n_docs, 0) AS n_docs,
        coalesce(n_active, 0) / $n_tokens::DOUBLE AS frequency,
        mean_activation,
        max_activation,
        kl_attr_sum,
        kl_attr_sum / n_active AS kl_attr_mean,
        kl_attr_max,
        coalesce(pos_mass, 0) AS pos_mass,
        coalesce(n_docs, 0) / $n_docs::DOUBLE AS doc_share,
        n_docs_all / $n_docs::DOUBLE AS doc_share_all,
        pos_mass_all,
        p.latent_id IS NOT NULL AND n_docs < $broad_docs * $n_docs AS narrow,
        n_docs_all >= $broad_docs * $n_docs AS broad,
        kl_attr_sum AS score_total,
        CASE WHEN n_active >= $min_support THEN kl_attr_sum / n_active END AS score_mean,
        kl_attr_max AS score_peak_token,
        peak_doc AS score_peak_doc,
        CASE WHEN pos_mass > 0 THEN list_sum(top_docs_desc) ^ 2 / pos_mass ELSE 0 END AS score_concentration,
        coalesce(list_sum(top_docs_desc[1:$top_m]), 0) / $top_m AS score_top_docs,
        CASE WHEN pos_mass > 0 THEN exp(pos_xlogx / pos_mass) ELSE 0 END AS score_focus,
        NULL::DOUBLE AS score_fusion  -- set in `fused`, from the ranks below
    FROM everywhere AS e LEFT JOIN per_latent AS p ON p.latent_id = e.latent_id
),
ranked AS (
    SELECT
        * EXCLUDE (narrow, broad),
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_total DESC NULLS LAST, latent_id) END
            AS rank_total,
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_mean DESC NULLS LAST, latent_id) END
            AS rank_mean,
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_peak_token DESC NULLS LAST, latent_id)
            END AS rank_peak_token,
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_peak_doc DESC NULLS LAST, latent_id)
            END AS rank_peak_doc,
        CASE WHEN narrow THEN row_number() OVER (
            ORDER BY narrow DESC, score_concentration DESC NULLS LAST, latent_id) END AS rank_concentration,
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_top_docs DESC NULLS LAST, latent_id)
            END AS rank_top_docs,
        CASE WHEN narrow THEN row_number() OVER (ORDER BY narrow DESC, score_focus DESC NULLS LAST, latent_id) END
            AS rank_focus,
        NULL::BIGINT AS rank_fusion,  -- set in `fused_ranked`
        CASE WHEN broad THEN row_number() OVER (ORDER BY broad DESC, pos_mass_all DESC, latent_id) END
            AS rank_broad
    FROM scored
),
fused AS (
    SELECT * REPLACE (
        CASE WHEN rank_mean IS NOT NULL THEN
            1.0::DOUBLE / ($rrf_k + rank_mean) + 1.0::DOUBLE / ($rrf_k + rank_peak_token)
            + 1.0::DOUBLE / ($rrf_k + rank_concentration)
        END AS score_fusion
    )
    FROM ranked
),
fused_ranked AS (
    SELECT * REPLACE (
        CASE WHEN score_fusion IS NOT NULL THEN row_number() OVER (ORDER BY score_fusion DESC NULLS LAST, latent_id)
        END AS rank_fusion
    )
    FROM fused
)
SELECT
    r.*,
    r.rank_{{rank_by}} AS rank,
    dom.dominant_behaviour,
    dom.dominant_share,
    dirs.promoted,
    dirs.suppressed
FROM fused_ranked AS r
LEFT JOIN ({{dominant}}) AS dom ON dom.latent_id = r.latent_id
LEFT JOIN {{latent_dirs}} AS dirs ON dirs.latent_id = r.latent_id
ORDER BY rank NULLS LAST, r.rank_broad NULLS LAST, r.latent_id
