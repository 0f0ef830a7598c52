"""Evaluation: own Y-channel PSNR/SSIM, pyiqa harness for the rest (optional extra), tables, plots."""
