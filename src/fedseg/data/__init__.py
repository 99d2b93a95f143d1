"""The data: label scheme, each dataset's layout and manifest, the synthetic phantom, downloads, and the
MONAI preprocessing (transforms, GIN augmentation). Imports nothing above it but `fedseg.config`.
"""
