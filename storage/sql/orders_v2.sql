-- orders_v2.sql: the orders recovery v2 and the false-alarm count judge (issue 15 parts 1-2), one row per
-- (latent, order): every score's rank (rank_<score>: narrow latents only) and two baselines over the same narrow
-- latents (rank not NULL): `frequency` (firing tokens, most first) and `firing_kl` (mean per-token KL(ft||base) at
-- its firing tokens, highest first), and `groups`: one entry per latent group (latent_groups), whose id is
-- -group_rank (storage/recovery.py adds the groups' summed attribution under those ids to the captures' input).
-- Inlined by storage/recovery.py.
-- Placeholders: {{latents}} (latent_id, n_active, rank and one rank_<score> per score: no other rank_ column);
-- {{firing_kl}} (latent_id, firing_kl); {{groups}} (latent_id, group_rank) or an empty relation.
-- Output: (latent_id, score, rnk).
WITH narrow AS (
    SELECT l.latent_id, l.n_active, f.firing_kl
    FROM {{latents}} AS l LEFT JOIN {{firing_kl}} AS f ON f.latent_id = l.latent_id
    WHERE l.rank IS NOT NULL
)
SELECT latent_id, substr(score_col, 6) AS score, rnk
FROM (UNPIVOT (SELECT latent_id, COLUMNS('^rank_') FROM {{latents}})
      ON COLUMNS('^rank_') INTO NAME score_col VALUE rnk)
UNION ALL
SELECT latent_id, 'frequency', row_number() OVER (ORDER BY n_active DESC, latent_id) FROM narrow
UNION ALL
SELECT latent_id, 'firing_kl', row_number() OVER (ORDER BY firing_kl DESC NULLS LAST, latent_id) FROM narrow
UNION ALL
SELECT -group_rank::INTEGER, 'groups', group_rank FROM (SELECT DISTINCT group_rank FROM {{groups}})
