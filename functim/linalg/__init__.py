"""Matrix maths shared by the matrix optimizers (Muon, Scion, SOAP, Kron): Newton–Schulz
orthogonalisation, matrix views / dimension merging of N-D tensors, eigenbases and triangular
preconditioners. Each piece is defined once here and used by every optimizer that needs it."""

from .eigen import eigh_descending, gram, power_qr_refresh, project, project_back
from .newton_schulz import NS5_COEFFICIENTS, default_ns_dtype, orthogonalize, orthogonalize_many
from .shapes import (
    MatrixDims,
    from_matrix,
    kron_merge_shape,
    matrix_shape,
    soap_merge_shape,
    to_matrix,
)
from .triangular import (
    balance_factors,
    kron_apply,
    kron_precondition,
    kron_solve_transposed,
    norm_lower_bound,
    solve_triangular_right,
    update_factors,
)

__all__ = ["NS5_COEFFICIENTS", "MatrixDims", "default_ns_dtype", "kron_merge_shape",
           "eigh_descending", "from_matrix", "gram", "matrix_shape", "power_qr_refresh",
           "project", "project_back", "orthogonalize", "orthogonalize_many",
           "soap_merge_shape", "to_matrix", "balance_factors", "kron_apply",
           "kron_precondition", "kron_solve_transposed", "norm_lower_bound",
           "solve_triangular_right", "update_factors"]
