#include <immintrin.h>
#include <cstdint>
struct tile_config_t{
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved_0[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};
void ggml_tile_config_init(void) {
    alignas(64) static const tile_config_t tc = {
        /* .palette_id = */ 1,
        /* .start_row  = */ 0,
        /* .reserved_0 = */ {},
        /* .colsb      = */ { 64, 64, 32, 32, 64, 64, 64, 64 },
        /* .rows       = */ {  8,  8, 16, 16, 16, 16, 16, 16 },
    };
    _tile_loadconfig(&tc);
}
