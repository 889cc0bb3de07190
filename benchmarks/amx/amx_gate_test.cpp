// Compiles ggml's amx.cpp exactly as the AMX ("sapphirerapids") CPU variant does and calls its
// gate, ggml_amx_init(), and ggml_backend_amx_buffer_type() on this machine. Only those
// functions run; the rest of amx.cpp is linked but never called.
#include "../../vendor/llama.cpp/ggml/src/ggml-cpu/amx/amx.cpp"
#include <cerrno>

// stubs for what the gate does not reach (the real ones live in the AVX-512 parts of ggml-cpu,
// which cannot run on this CPU); ggml_backend_cpu_reg() would run ggml_cpu_init() (AVX-512)
void ggml_backend_amx_convert_weight(ggml_tensor *, const void *, size_t, size_t) { abort(); }
size_t ggml_backend_amx_desired_wsize(const ggml_tensor *) { abort(); }
size_t ggml_backend_amx_get_alloc_size(const ggml_tensor *) { abort(); }
void ggml_backend_amx_mul_mat(const ggml_compute_params *, ggml_tensor *) { abort(); }
std::vector<ggml_backend_buffer_type_t> & ggml_backend_cpu_get_extra_buffer_types() { abort(); }
extern "C" ggml_backend_reg_t ggml_backend_cpu_reg(void) { return nullptr; }
extern "C" ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t, size_t) { return nullptr; }

int main() {
    unsigned a, b, c, d;
    __get_cpuid_count(7, 0, &a, &b, &c, &d);
    uint32_t lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    printf("cpuid(7).edx: amx-bf16=%u amx-tile=%u amx-int8=%u; XCR0=0x%x%08x (bits 17,18: %u,%u)\n",
           (d >> 22) & 1, (d >> 24) & 1, (d >> 25) & 1, hi, lo, (lo >> 17) & 1, (lo >> 18) & 1);
    long rc = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    printf("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) = %ld (%s)\n", rc, rc ? strerror(errno) : "ok");
    printf("ggml_amx_cpu_has_amx() = %d\n", ggml_amx_cpu_has_amx());
    for (int i = 0; i < 3; i++) {
        printf("ggml_backend_amx_buffer_type() = %p\n", (void *) ggml_backend_amx_buffer_type());
    }
    return 0;
}
