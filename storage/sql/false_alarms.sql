-- false_alarms.sql: how many of each order's top $top_k would pass recovery v2 for a label that does not exist
-- (issue 15 part 2). Run by storage/recovery.py false_alarms() with placebo labels: ordinary documents drawn into
-- labels at the planted rate (seeded); a latent that captures a placebo label (captures_v2.sql: precision and
-- coverage on held-out documents) is a false alarm.
-- Placeholders: {{captures}} captures_v2.sql over the placebo labels; {{orders}} orders_v2.sql.
-- Parameters: $precision, $coverage (of captures_v2.sql), $top_k.
-- Per order: false_alarms = distinct entries ranked <= $top_k that capture some placebo label (for `groups`, an
-- entry is a group, judged on its members' summed attribution).
WITH captures AS (
    {{captures}}
),
orders AS (
    {{orders}}
)
SELECT
    o.score,
    count(DISTINCT o.latent_id) FILTER (WHERE o.rnk <= $top_k AND c.latent_id IS NOT NULL) AS false_alarms
FROM orders AS o LEFT JOIN (SELECT DISTINCT latent_id FROM captures) AS c ON c.latent_id = o.latent_id
GROUP BY o.score
