"""Runs made of studies: sweeps over options, the end-to-end study and its report."""
