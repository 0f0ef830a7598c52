"""Video super-resolution with XPSR: streaming, chunked and resumable, with measured temporal stability
(docs/video.md)."""
