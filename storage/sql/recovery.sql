-- recovery.sql: does each score put the planted behaviours near the top? (issue 6 part 6, issue 9 part 3)
-- Run by storage/ranking.py recovery(). Placeholders: {{behaviour_mass}} (behaviour_mass.sql), {{docs}} (doc_id,
-- behaviour), {{latents}} (a rank_latents table: latent_id, pos_mass and one rank_<score> per score).
-- Parameters: $capture_share (0.8), $top_k (10), $scores (score names, in output order).
-- A latent captures planted behaviour b when >= $capture_share of its positive attribution mass (pos_mass) lies in
-- documents labelled b. Planted behaviours: the docs labels other than NULL/''/'none'. Per (score, behaviour):
--   best_rank = best rank under that score of a latent capturing b (NULL: no latent captures b),
--   recovered = best_rank <= $top_k;
-- per score: top10_capture_fraction = share of the latents ranked <= $top_k that capture some planted behaviour.
WITH mass AS (
    {{behaviour_mass}}
),
captures AS (
    SELECT m.latent_id, m.behaviour
    FROM mass AS m JOIN {{latents}} AS l ON l.latent_id = m.latent_id
    WHERE l.pos_mass > 0 AND m.pos_mass / l.pos_mass >= $capture_share
),
planted AS (
    SELECT DISTINCT behaviour FROM {{docs}} WHERE behaviour IS NOT NULL AND behaviour NOT IN ('', 'none')
),
ranks AS (
    SELECT latent_id, substr(score_col, 6) AS score, rnk
    FROM (UNPIVOT (SELECT latent_id, COLUMNS('^rank_') FROM {{latents}}) ON COLUMNS('^rank_')
          INTO NAME score_col VALUE rnk)
),
scores AS (
    SELECT unnest($scores) AS score
),
best AS (
    SELECT r.score, c.behaviour, min(r.rnk) AS best_rank
    FROM ranks AS r JOIN captures AS c ON c.latent_id = r.latent_id
    GROUP BY ALL
),
top AS (
    SELECT
        r.score,
        count(DISTINCT r.latent_id) FILTER (WHERE c.latent_id IS NOT NULL) / count(DISTINCT r.latent_id)::DOUBLE
            AS top10_capture_fraction
    FROM ranks AS r LEFT JOIN captures AS c ON c.latent_id = r.latent_id
    WHERE r.rnk <= $top_k
    GROUP BY r.score
)
SELECT
    s.score,
    p.behaviour,
    b.best_rank,
    coalesce(b.best_rank <= $top_k, false) AS recovered,
    coalesce(t.top10_capture_fraction, 0.0) AS top10_capture_fraction
FROM scores AS s
CROSS JOIN planted AS p
LEFT JOIN best AS b ON b.score = s.score AND b.behaviour = p.behaviour
LEFT JOIN top AS t ON t.score = s.score
ORDER BY list_position($scores, s.score), p.behaviour
