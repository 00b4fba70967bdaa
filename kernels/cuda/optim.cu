// optim.cu -- fused optimizer updates: one pass over each parameter instead of five to ten array ops.
//
// NumPy reference: unet_np/optim.py -- SGD._update and Adam._update (AdamW: the decoupled decay),
// which repeat torch.optim's single-tensor updates operation for operation. The same order is kept
// here; every hyper-parameter arrives already rounded to T, as NumPy rounds a Python float that
// meets a float32 array.
// Python side: unet_np/backends/cupy_backend.py (CudaKernels.sgd_step, CudaKernels.adam_step).

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

// SGD (torch.optim.SGD):
//   g = grad + weight_decay * p
//   buf = g (first step), else buf = momentum * buf + (1 - dampening) * g     (when momentum != 0)
//   g = g + momentum * buf (nesterov), else g = buf                           (when momentum != 0)
//   p = p - lr * g
template <typename T>
__device__ void sgd_step(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ buf, long long n,
                         T lr, T momentum, T one_minus_dampening, T weight_decay,
                         long long use_momentum, long long nesterov, long long first) {
    GRID_STRIDE(i, n) {
        T g = grad[i];
        if (weight_decay != (T)0) g = g + weight_decay * p[i];
        if (use_momentum) {
            T b;
            if (first) b = g;
            else b = buf[i] * momentum + one_minus_dampening * g;
            buf[i] = b;
            g = nesterov ? g + momentum * b : b;
        }
        p[i] = p[i] - lr * g;
    }
}

// Adam / AdamW (torch.optim.Adam, AdamW):
//   p = p * (1 - lr * weight_decay)                         (AdamW: decoupled)
//   g = grad + weight_decay * p                             (Adam: L2 in the gradient)
//   m = m + (1 - beta1) (g - m)      (torch's lerp; its other branch when 1 - beta1 >= 0.5)
//   v = beta2 v + (1 - beta2) g^2
//   vmax = max(vmax, v), and v below is vmax                (amsgrad)
//   p = p - (m * step_size) / (sqrt(v) / bc2_sqrt + eps),
//   step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)
template <typename T>
__device__ void adam_step(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m, T* __restrict__ v,
                          T* __restrict__ vmax, long long n, T weight_decay, T decay_factor, long long decoupled,
                          T w1, T one_minus_w1, T beta2, T one_minus_beta2, T step_size, T bc2_sqrt, T eps,
                          long long amsgrad) {
    GRID_STRIDE(i, n) {
        T pi = p[i];
        T g = grad[i];
        if (weight_decay != (T)0) {
            if (decoupled) pi = pi * decay_factor;
            else g = g + weight_decay * pi;
        }
        T mi = m[i];
        if (w1 < (T)0.5) mi = mi + w1 * (g - mi);
        else mi = g - (g - mi) * one_minus_w1;
        m[i] = mi;
        T vi = v[i] * beta2 + (one_minus_beta2 * g) * g;
        v[i] = vi;
        if (amsgrad) {
            const T mx = vmax[i] > vi ? vmax[i] : vi;
            vmax[i] = mx;
            vi = mx;
        }
        const T denom = sqrt_(vi) / bc2_sqrt + eps;
        p[i] = pi - (mi * step_size) / denom;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define SGD_ARGS(T) T* p, const T* grad, T* buf, long long n, T lr, T momentum, T one_minus_dampening, \
    T weight_decay, long long use_momentum, long long nesterov, long long first
#define SGD_PASS p, grad, buf, n, lr, momentum, one_minus_dampening, weight_decay, use_momentum, nesterov, first
extern "C" __global__ void sgd_step_f32(SGD_ARGS(float)) { sgd_step<float>(SGD_PASS); }
extern "C" __global__ void sgd_step_f64(SGD_ARGS(double)) { sgd_step<double>(SGD_PASS); }

#define ADAM_ARGS(T) T* p, const T* grad, T* m, T* v, T* vmax, long long n, T weight_decay, T decay_factor, \
    long long decoupled, T w1, T one_minus_w1, T beta2, T one_minus_beta2, T step_size, T bc2_sqrt, T eps, \
    long long amsgrad
#define ADAM_PASS p, grad, m, v, vmax, n, weight_decay, decay_factor, decoupled, w1, one_minus_w1, beta2, \
    one_minus_beta2, step_size, bc2_sqrt, eps, amsgrad
extern "C" __global__ void adam_step_f32(ADAM_ARGS(float)) { adam_step<float>(ADAM_PASS); }
extern "C" __global__ void adam_step_f64(ADAM_ARGS(double)) { adam_step<double>(ADAM_PASS); }
