"""Speech corpora in their published layouts (IEMOCAP, CREMA-D, MSP-Improv, EmoDB, RAVDESS, a
manifest CSV), the synthetic corpora written in the same layouts, clients and speaker-independent folds."""
