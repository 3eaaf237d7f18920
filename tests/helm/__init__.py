"""Tests of the Helm chart, the images and the GitOps files."""
