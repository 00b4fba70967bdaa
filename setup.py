"""unet_np: a U-Net for semantic segmentation with every forward and backward pass written by hand.

`pip install .` needs NumPy only. Extras: numba, cuda12 / cuda13, numba-cuda, viz, test (see README).
The folder kernels/ is installed as the sub-package unet_np.kernels (never as a top-level `kernels`,
a name that belongs to another PyPI project).
"""
from setuptools import setup

setup(
    name="unet-np",
    version="0.1.0",
    description="U-Net with hand-written forward and backward passes on NumPy, Numba and CUDA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "unet_np",
        "unet_np.nn",
        "unet_np.models",
        "unet_np.backends",
        "unet_np.cli",
        "unet_np.data",
        "unet_np.kernels",
        "unet_np.kernels.cuda",
    ],
    package_dir={"unet_np.kernels": "kernels", "unet_np.kernels.cuda": "kernels/cuda"},
    package_data={"unet_np.kernels.cuda": ["*.cu"]},
    install_requires=["numpy>=1.24"],
    extras_require={
        "numba": ["numba>=0.59", "threadpoolctl>=3"],
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=13"],
        "numba-cuda": ["numba>=0.59", "numba-cuda>=0.20"],
        "viz": ["matplotlib>=3.7", "Pillow>=10", "tqdm>=4.60"],
        "tiff": ["tifffile"],
        "onnx": ["onnx>=1.14"],
        "mpi": ["mpi4py>=3.1", "mpich>=4"],
        "test": ["pytest>=7", "hypothesis>=6", "torch==2.13.0", "numba>=0.59", "numba-cuda>=0.20",
                 "Pillow>=10", "matplotlib>=3.7", "tqdm>=4.60", "threadpoolctl>=3",
                 "psutil>=5", "onnx>=1.14", "onnxruntime>=1.16", "mpi4py>=3.1", "mpich>=4",
                 "scipy>=1.10", "tifffile",
                 # the peers the converters are checked against (unet_np.interop)
                 "monai>=1.3", "dynamic-network-architectures>=0.3"],
    },
    entry_points={"console_scripts": ["unet-np=unet_np.cli:main"]},
)
