// Loads one ggml CPU backend library (a path, or the best variant found in a directory) and
// lists the extra buffer types it offers. With the AMX variant on a machine without AMX, the
// AMX buffer type must be absent (and a warning logged), not crash.
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <cstdio>
#include <cstring>
#include <dlfcn.h>

int main(int argc, char ** argv) {
    ggml_backend_reg_t reg = nullptr;
    if (argc > 2 && strcmp(argv[2], "force") == 0) {
        // this exact variant, even if its score says the CPU lacks its features
        void * lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
        if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
        auto init = (ggml_backend_reg_t (*)(void)) dlsym(lib, "ggml_backend_init");
        reg = init ? init() : nullptr;
    } else if (argc > 1 && strstr(argv[1], ".so")) {
        reg = ggml_backend_load(argv[1]);          // refused if its score is 0
    } else {
        ggml_backend_load_all_from_path(argc > 1 ? argv[1] : nullptr);
        reg = ggml_backend_reg_by_name("CPU");
    }
    if (!reg) { printf("no CPU backend loaded\n"); return 1; }
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    printf("CPU backend: %s (%s)\n", ggml_backend_dev_name(dev), ggml_backend_dev_description(dev));
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) { printf("no extra buffer types entry point\n"); return 1; }
    int n = 0;
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; ++b, ++n) {
        printf("extra buffer type: %s\n", ggml_backend_buft_name(*b));
    }
    printf("%d extra buffer type(s)\n", n);
    auto get_features = (ggml_backend_get_features_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
    if (get_features) {
        for (ggml_backend_feature * f = get_features(reg); f && f->name; ++f) {
            printf("%s=%s ", f->name, f->value);
        }
        printf("\n");
    }
    return 0;
}
