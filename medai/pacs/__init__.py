"""The project inside the hospital's DICOM network: a node that receives images (C-STORE SCP), a durable
queue in the store, the DICOM objects written back into the study (SR + heatmap overlays), sending them
(C-STORE SCU or STOW-RS) and a DICOMweb client for query/retrieve. It reaches the models only through
:mod:`medai.analysis`, the door the Analyze page and the HTTP API use."""
