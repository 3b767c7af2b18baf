"""Reports of stored sessions: summaries, plots, CSV and JSON, and HL7 FHIR R4 Bundles."""
