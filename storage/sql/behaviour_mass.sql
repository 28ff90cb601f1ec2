-- behaviour_mass.sql: each latent's positive attribution mass in the documents of each PLANTED label.
-- Inlined by storage/ranking.py into rank_latents.sql (dominant_behaviour) and recovery.sql (captures).
-- Inputs: {{latent_docs}} (latent_id, doc_id, attr_sum: the latent_docs table, or latent_docs.sql restricted to
-- planted documents) and {{docs}} (doc_id, behaviour). Planted = behaviour not NULL, '' or 'none'.
-- pos_mass = sum over the latent's documents d with that label of max(S_d, 0), S_d = its attribution summed over d.
-- Only planted documents are joined (an inner join against a small table); the 'none' mass is the latent's total
-- positive mass (rank_latents.sql: pos_mass) minus the planted masses.
SELECT ld.latent_id, d.behaviour, sum(greatest(ld.attr_sum, 0)) AS pos_mass
FROM {{latent_docs}} AS ld
JOIN (SELECT doc_id, behaviour FROM {{docs}} WHERE behaviour IS NOT NULL AND behaviour NOT IN ('', 'none'))
    AS d ON d.doc_id = ld.doc_id
GROUP BY ld.latent_id, d.behaviour
